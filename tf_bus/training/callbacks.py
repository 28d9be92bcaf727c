"""Keras callbacks shared by the training entry points."""

from __future__ import annotations

import time

import keras
import numpy as np


class TimeBudget(keras.callbacks.Callback):
    """Stops training after the epoch during which ``minutes`` of wall time have passed.

    The clock starts when ``fit`` starts (a resumed run gets a fresh budget).
    """

    def __init__(self, minutes: float):
        super().__init__()
        self.minutes = minutes
        self.start = None
        self.stopped_epoch = None

    def on_train_begin(self, logs=None):
        self.start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        if self.minutes and (time.monotonic() - self.start) / 60.0 >= self.minutes:
            self.stopped_epoch = epoch
            self.model.stop_training = True
            print(f"\nTimeBudget: {self.minutes:g} min reached after epoch {epoch + 1}; stopping.")


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
        pred = np.asarray(self.model.predict(self.images, verbose=0), np.float32)
        grey = self.images.mean(axis=-1, keepdims=True)
        strip = np.concatenate([grey, self.masks, pred], axis=2)  # side by side
        with self._writer.as_default():
            tf.summary.image("val/image_truth_prediction", strip, step=epoch, max_outputs=len(strip))
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
