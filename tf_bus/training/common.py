"""Helpers every trainer shares: the optimizer and schedule, RUN_DIR bookkeeping."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras

from tf_bus.data.busi import TfBusError
from tf_bus.models.optimizers import FusedAdam
from tf_bus.models.schedules import BudgetedCosine


def leaves_no_empty_run_dir(train: Callable[..., Any]) -> Callable[..., Any]:
    """Decorates a trainer ``train(data, run_dir, ...)``: when it fails and ``run_dir`` did
    not exist before the call, the empty folders it left there (and the parents it made)
    are removed, so a run refused for its data, weights or settings leaves no empty RUN_DIR
    behind. Files are never removed: a run that wrote anything (a config, a checkpoint, a
    backup) stays as it is, and so does a folder that existed before."""

    @functools.wraps(train)
    def wrapper(data, run_dir, *args, **kwargs):
        new = Path(run_dir).expanduser().resolve()  # the outermost folder this call may create
        existed = new.exists()
        while not existed and not new.parent.exists():
            new = new.parent
        try:
            return train(data, run_dir, *args, **kwargs)
        except BaseException:
            if not existed and new.is_dir():
                for folder, _, _ in sorted(os.walk(new), key=lambda entry: -len(entry[0])):
                    with contextlib.suppress(OSError):  # not empty: kept
                        os.rmdir(folder)
            raise

    return wrapper


def make_optimizer(learning_rate: float, schedule: str, warmup_epochs: int, epochs: int,
                   steps_per_epoch: int, weight_decay: float, ema: float = 0.0) -> keras.optimizers.Optimizer:
    """AdamW (Adam when ``weight_decay`` is 0) with a ``cosine`` (linear warm-up, then
    cosine decay to 1%, by steps or by the time budget, whichever is further: see
    ``BudgetedCosine``), or a constant learning rate (``plateau``/``constant``: the
    ReduceLROnPlateau callback does the rest). ``ema`` above 0 keeps an exponential
    moving average of the weights with that momentum (give ``fit`` an ``EMAWeights``).
    Keras's arithmetic, with one fused kernel per variable (``FusedAdam``: a ResNet50
    training step traces in about half the time)."""
    lr: Any = learning_rate
    if schedule == "cosine":
        lr = BudgetedCosine(learning_rate, warmup_epochs * steps_per_epoch, epochs * steps_per_epoch)
    averaging: dict[str, Any] = dict(use_ema=True, ema_momentum=ema) if ema > 0 else {}
    return FusedAdam(learning_rate=lr, weight_decay=weight_decay if weight_decay > 0 else None, **averaging)


def ordered(config) -> bool:
    """Whether a training config's loaders must keep their element order: with
    ``deterministic`` (one seed, one run) and under ``multiworker`` (each worker keeps its
    rows of every global batch, so all must see the same order)."""
    return bool(config.deterministic) or config.strategy == "multiworker"


@contextlib.contextmanager
def op_determinism(enabled: bool) -> Iterator[None]:
    """TensorFlow's deterministic kernels while the block runs (``enabled``), as
    ``tf.config.experimental.enable_op_determinism`` sets them for the whole process; the
    setting the process had is restored afterwards, so a later run in the same process
    is not slowed by it. ``enabled=False`` changes nothing."""
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    before = tf_config.is_op_determinism_enabled()
    if enabled and not before:
        tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if enabled and not before:
            tf_config.disable_op_determinism()


def build_before_fit(model: keras.Model) -> None:
    """Creates the compiled optimizer's slot variables now, in the caller's strategy scope.

    Keras creates them lazily in the first step, inside ``fit``'s first ``tf.function``
    trace; TensorFlow then traces that function a second time (a function may create
    variables only on its first trace). For a ResNet50 training step one trace costs about
    30 s on 2 cores, so every ``fit`` paid it twice. Call it after ``compile`` (and after any
    change to what is trainable). Metrics that build lazily must be built by their owner
    (see ``compile_classifier``)."""
    model.optimizer.build(model.trainable_variables)


def software_record(model: keras.Model) -> dict[str, Any]:
    """What a run's ``config.json`` records of the software it ran on, and the model's size."""
    import tensorflow as tf

    import tf_bus
    from tf_bus.training.precision import gpu_compute_capabilities, onednn_enabled

    gpus = [f"{cc[0]}.{cc[1]}" if cc else None for cc in gpu_compute_capabilities()]  # what `auto` decided on
    return {"tf_bus_version": tf_bus.__version__, "keras_version": keras.__version__,
            "tensorflow_version": tf.__version__, "onednn": onednn_enabled(), "gpu_compute_capabilities": gpus,
            "parameters": model.count_params()}


RUN_KINDS = ("segmenter", "classifier")


def claim_folder(folder: Path, record: dict[str, Any], *, overwrite: bool, what: str, stale: tuple[str, ...]) -> None:
    """Writes ``record`` to FOLDER/config.json for work of several runs that resumes (``--folds``,
    ``--ensemble``): the same record resumes; another is refused naming the settings that
    differ, unless ``overwrite``, which first removes what the ``stale`` globs match."""
    import shutil

    from tf_bus.io import write_json_atomic

    saved = folder / "config.json"
    if saved.exists() and (overwrite or json.loads(saved.read_text()) != record):
        if not overwrite:
            changes = settings_changes(json.loads(saved.read_text()), record)
            raise TfBusError(f"{folder}: holds {what} with other settings ({changes}); pass the same flags and data "
                             "to resume it, --overwrite to replace it, or another --out.")
        for pattern in stale:
            for old in folder.glob(pattern):
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved, record)


def run_finished(run_dir: str | Path) -> bool:
    """Whether a training run in RUN_DIR ran to its end: ``history.json`` written and no
    ``backup/`` (BackupAndRestore's, removed when the fit ends) left to resume from."""
    run_dir = Path(run_dir)
    return (run_dir / "history.json").exists() and not (run_dir / "backup").exists()


def read_run_record(run_dir: str | Path, expected: str | None = None) -> tuple[str, dict[str, Any]]:
    """(kind, ``config.json`` record) of one ``tf-bus train-segmenter`` or ``train-classifier``
    run folder. Refuses in one line, naming the folder and the fix: a folder without a
    readable ``config.json``, a ``--folds K`` cross-validation folder (its models are in
    ``fold_0`` ...), and, when ``expected`` names a kind, a run of the other kind."""
    run_dir = Path(run_dir)
    file = run_dir / "config.json"
    what = f"`tf-bus train-{expected}`" if expected else "`tf-bus train-segmenter` or `train-classifier`"
    try:
        record = json.loads(file.read_text())
    except FileNotFoundError:
        raise TfBusError(f"{file}: missing; is {run_dir} a {what} run folder?") from None
    except (OSError, ValueError) as e:
        raise TfBusError(f"{file}: cannot be read as JSON ({e}); is {run_dir} a {what} run folder?") from None
    config = record.get("config") if isinstance(record, dict) else None
    if not isinstance(config, dict):
        raise TfBusError(f"{file}: has no \"config\" object; is {run_dir} a {what} run folder?")
    kind = record.get("kind") or ("classifier" if "backbone" in config else "segmenter")
    if "folds" in record:
        k = record["folds"]
        raise TfBusError(
            f"{run_dir}: is a {k}-fold cross-validation of the {kind}; its models are in {run_dir}/fold_0 to "
            f"fold_{int(k) - 1}. Pass one fold's folder here. The whole folder goes to `tf-bus compare`, "
            "`fuse`, and, as its folds averaged, `export`, `predict --run` and the evaluate commands.")
    if "ensemble" in record:
        k = record["ensemble"]
        raise TfBusError(
            f"{run_dir}: is a {k}-member ensemble of the {kind}; its models are in {run_dir}/member_0 to "
            f"member_{int(k) - 1}. Pass one member's folder here. The whole folder goes, as its members averaged, "
            "to `export`, `predict --run` and the evaluate commands.")
    if kind not in RUN_KINDS:
        raise TfBusError(f"{file}: kind {kind!r} is not a training run's; is {run_dir} a {what} run folder?")
    if expected is not None and kind != expected:
        raise TfBusError(f"{run_dir}: holds a `tf-bus train-{kind}` run, not a train-{expected} one; "
                         f"evaluate it with `tf-bus evaluate-{kind}`.")
    return kind, record


def settings_changes(saved: Any, wanted: Any, limit: int = 4) -> str:
    """The settings two run records disagree on, for an error message: ``"seed: 1337 in
    it, 5 now; data: '/a' in it, '/b' now"`` (dotted paths into nested dicts; at most
    ``limit`` named, then how many more). Empty when they agree."""
    changes: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                walk(a.get(key, "(unset)"), b.get(key, "(unset)"), f"{path}.{key}" if path else str(key))
        elif a != b:
            changes.append(f"{path or 'record'}: {a!r} in it, {b!r} now")

    walk(saved, wanted, "")
    more = f"; and {len(changes) - limit} more" if len(changes) > limit else ""
    return "; ".join(changes[:limit]) + more


def check_run_dir(run_dir: Path, record: dict[str, Any], overwrite: bool,
                  outputs: tuple[str, ...] = ("best.keras", "last.keras", "history.csv", "history.json"),
                  config_class: Any = None) -> bool:
    """Returns True when the run in ``run_dir`` resumes (an unfinished run with the same
    config and data). Refuses a finished run unless ``overwrite`` (then removes its
    ``outputs``) and an unfinished run with another config. With ``config_class`` (the
    config's dataclass), a saved config is first read as that class reads it, so a run
    saved before a field existed resumes when the field's old meaning is today's value."""
    saved = run_dir / "config.json"
    if not saved.exists():
        return False
    old = json.loads(saved.read_text())
    if (run_dir / "backup").exists():
        old_config = old.get("config")
        if config_class is not None and isinstance(old_config, dict) and old_config != record["config"]:
            try:
                old_config = json.loads(json.dumps(config_class.from_dict(old_config).to_dict()))
            except (ValueError, TypeError):  # not a config of this class: it differs
                pass
        if old_config != record["config"] or old.get("data") != record["data"]:
            changes = settings_changes({"config": old_config, "data": old.get("data")},
                                       {"config": record["config"], "data": record["data"]})
            raise TfBusError(
                f"{run_dir}: holds an unfinished run with another config or data ({changes}); resume it with "
                "the same flags and data, or pass another --out."
            )
        return True
    if not overwrite:
        raise TfBusError(f"{run_dir}: holds a finished run. Pass --overwrite to replace it, or another --out.")
    for name in outputs:
        (run_dir / name).unlink(missing_ok=True)
    return False
