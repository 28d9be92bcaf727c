"""Keras callbacks shared by the training entry points."""

from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from tf_bus.io import save_atomic


def best_logged(csv_path: str | os.PathLike, monitor: str, mode: str = "max",
                before_epoch: int | None = None) -> float | None:
    """The best ``monitor`` value in a CSVLogger file (the epochs a resumed run already
    trained; with ``before_epoch``, only the rows of earlier epochs), or None when there is none."""
    path = Path(csv_path)
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        rows = [row for row in csv.DictReader(f)
                if before_epoch is None or int(row["epoch"]) < before_epoch]
    values = [float(row[monitor]) for row in rows if row.get(monitor) not in (None, "")]
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


class BestCheckpoint(keras.callbacks.Callback):
    """Saves the model when ``monitor`` improves, like ``ModelCheckpoint(save_best_only=True)``,
    with three differences: it saves ``to_save(model)`` (the image-only classifier of a
    multi-task training model), it starts from the best so far of a resumed run or an
    earlier phase (``initial``, or the rows of ``history`` for epochs before this fit's
    first, read when that epoch ends), so resuming never replaces the best model by a
    worse one, and it writes a temporary file that is renamed into place (never a
    half-written ``.keras``)."""

    def __init__(self, path: str | os.PathLike, monitor: str, mode: str = "max", *,
                 to_save: Callable[[keras.Model], keras.Model] | None = None, initial: float | None = None,
                 history: str | os.PathLike | None = None):
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"`mode` must be max or min. Received: mode={mode!r}")
        self.path = Path(path)
        self.monitor = monitor
        self.mode = mode
        self.to_save = to_save or (lambda m: m)
        self.best = initial if initial is not None else (-math.inf if mode == "max" else math.inf)
        self.history = history
        self._read_history = history is not None

    def on_train_begin(self, logs=None):
        self._read_history = self.history is not None

    def on_epoch_end(self, epoch, logs=None):
        if self._read_history:  # epochs this fit runs again (a killed run's last) do not count
            self._read_history = False
            logged = best_logged(self.history, self.monitor, self.mode, before_epoch=epoch)
            if logged is not None:
                self.best = logged
        value = (logs or {}).get(self.monitor)
        if value is None or not math.isfinite(float(value)):
            return
        value = float(value)
        if (value > self.best) if self.mode == "max" else (value < self.best):
            self.best = value
            save_atomic(self.path, self.to_save(self.model).save)


class HistoryCSV(keras.callbacks.CSVLogger):
    """Keras' ``CSVLogger`` whose file keeps one row per finished epoch through kills and
    resumes. Put it before ``BackupAndRestore``: an epoch's row is then written before the
    backup counts the epoch as done. A run killed between the two runs that epoch again
    when it resumes, and at its first epoch end the rows of that epoch and later ones are
    dropped (the file rewritten atomically) before the new row is appended. Without this,
    a kill after the backup and before the row lost the row for good."""

    def __init__(self, filename: str | os.PathLike, append: bool = False):
        super().__init__(str(filename), append=append)
        self._trim = append

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._trim = self.append

    def on_epoch_end(self, epoch, logs=None):
        if self._trim:
            self._trim = False
            self._drop_rows_from(epoch)
        super().on_epoch_end(epoch, logs)

    def _drop_rows_from(self, epoch: int) -> None:
        from tf_bus.io import write_bytes_atomic

        path = Path(self.filename)
        lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
        keep = lines[:1] + [line for line in lines[1:] if int(line.split(self.sep, 1)[0]) < epoch]
        if len(keep) == len(lines):
            return
        self.csv_file.close()
        write_bytes_atomic(path, "".join(keep).encode())
        self.csv_file = open(path, "a")  # closed by on_train_end, as Keras closes its own


class TimeBudget(keras.callbacks.Callback):
    """Stops training after the epoch during which ``minutes`` of wall time have passed.

    The clock starts when the first ``fit`` using this callback starts and runs on over
    later ``fit`` calls (the classifier's head and fine-tuning phases share one budget); a
    resumed run gets a fresh budget. When the optimizer's schedule is a ``BudgetedCosine``
    and ``feed_schedule`` is on, the share of this ``fit``'s part of the budget (what was
    left when it started) is written to it before every batch, so each phase's schedule
    has annealed when the budget runs out. (Off under multiworker: each worker's clock
    differs, and the learning rate must not; nor with ``deterministic``: see ``for_config``.)
    """

    def __init__(self, minutes: float, *, feed_schedule: bool = True):
        super().__init__()
        self.minutes = minutes
        self.feed_schedule = feed_schedule
        self.start = None
        self.stopped_epoch = None
        self._progress = None
        self._fit_start = None
        self._fit_seconds = None

    @classmethod
    def for_config(cls, config) -> "TimeBudget":
        """The budget of a training config (``time_budget_minutes``, ``strategy``,
        ``deterministic``): the clock feeds the schedule unless the learning rate must not
        depend on it (multiworker, deterministic)."""
        return cls(config.time_budget_minutes,
                   feed_schedule=config.strategy != "multiworker" and not config.deterministic)

    def elapsed_minutes(self) -> float:
        return 0.0 if self.start is None else (time.monotonic() - self.start) / 60.0

    def on_train_begin(self, logs=None):
        from tf_bus.models.schedules import BudgetedCosine

        now = time.monotonic()
        if self.start is None:
            self.start = now
        self._fit_start = now
        self._fit_seconds = max(1e-6, 60.0 * self.minutes - (now - self.start))
        schedule = getattr(self.model.optimizer, "_learning_rate", None)  # the schedule Keras was given
        self._progress = (schedule.time_progress if self.minutes and self.feed_schedule
                          and isinstance(schedule, BudgetedCosine) else None)

    def on_train_batch_begin(self, batch, logs=None):
        if self._progress is not None:
            self._progress.assign(min(1.0, (time.monotonic() - self._fit_start) / self._fit_seconds))

    def on_epoch_end(self, epoch, logs=None):
        if self.minutes and self.elapsed_minutes() >= self.minutes:
            self.stopped_epoch = epoch
            self.model.stop_training = True
            print(f"\nTimeBudget: {self.minutes:g} min reached after epoch {epoch + 1}; stopping.")


class EMAWeights(keras.callbacks.SwapEMAWeights):
    """``keras.callbacks.SwapEMAWeights(swap_on_epoch=True)`` for an optimizer with
    ``use_ema=True``, made safe for runs that stop early.

    Validation runs on the averaged weights, and so do the callbacks after this one in
    ``fit``'s list from the end of each epoch on (put ``BestCheckpoint`` after it); the raw
    weights come back when the next epoch starts. Keras' callback hands the averaged weights
    to the model at the end of ``fit`` only when the last epoch runs: a run stopped by
    ``EarlyStopping`` or ``TimeBudget`` would end on the raw weights (``fit`` copies the
    optimizer's slots, which then hold the raw weights, into the model). This one also does
    it when ``model.stop_training`` is set, so put the callbacks that stop training before
    it, and ``BackupAndRestore`` before it too, so that a backup holds the raw weights and
    the averages, each in its own place.
    """

    def __init__(self):
        super().__init__(swap_on_epoch=True)

    def on_epoch_end(self, epoch, logs=None):
        last = epoch == self.params["epochs"] - 1
        super().on_epoch_end(epoch, logs)  # swaps the averages in; finalizes on the last epoch
        if self.model.stop_training and not last:
            self._finalize_ema_values()


class MaskOverlays(keras.callbacks.Callback):
    """Writes image | truth | prediction strips of a fixed validation batch to TensorBoard.

    Args:
        images: float32 (N, H, W, C) in [0, 1].
        masks: float32 (N, H, W, 1) in {0, 1}.
        log_dir: the TensorBoard log folder (written under ``log_dir/overlays``).
        every: write every this many epochs.
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, log_dir: str, every: int = 1):
        super().__init__()
        self.images, self.masks, self.log_dir, self.every = images, masks, log_dir, every
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        if epoch % self.every:
            return
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(f"{self.log_dir}/overlays")
        # One eager call on a handful of images, cheaper than predict(), which sets up a
        # tf.data pipeline and a distributed step each time (0.075 against 0.11 s an epoch).
        # Under a strategy the call runs in the cross-replica context on the mirrored
        # weights, one output per image (tested).
        pred = np.asarray(self.model(self.images, training=False), np.float32)
        grey = self.images.mean(axis=-1, keepdims=True)
        strip = np.concatenate([grey, self.masks, pred], axis=2)  # side by side
        with self._writer.as_default():
            tf.summary.image("val/image_truth_prediction", strip, step=epoch, max_outputs=len(strip))
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
