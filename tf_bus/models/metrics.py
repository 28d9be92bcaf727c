"""Keras metrics for masks: Dice and IoU at a threshold, per image, averaged over images.

Edge case, by definition: an image whose truth and thresholded prediction are both
empty scores 1.0 (a perfect answer for a normal image); one empty and the other not
scores 0.0.
"""

from __future__ import annotations

import keras
from keras import ops


class _PerImageOverlap(keras.metrics.Metric):
    def __init__(self, threshold: float = 0.5, name: str | None = None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.threshold = threshold
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def _score(self, inter, size_true, size_pred):
        raise NotImplementedError

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.cast(ops.cast(y_true, "float32") > 0.5, "float32")
        y_pred = ops.cast(ops.cast(y_pred, "float32") >= self.threshold, "float32")
        axes = list(range(1, len(y_pred.shape)))
        inter = ops.sum(y_true * y_pred, axis=axes)
        scores = self._score(inter, ops.sum(y_true, axis=axes), ops.sum(y_pred, axis=axes))
        self.total.assign_add(ops.sum(scores))
        self.count.assign_add(ops.cast(ops.shape(scores)[0], "float32"))

    def result(self):
        return ops.divide_no_nan(self.total, self.count)

    def reset_state(self):
        self.total.assign(0.0)
        self.count.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold}


@keras.saving.register_keras_serializable(package="tf_bus")
class DiceScore(_PerImageOverlap):
    """Mean per-image Dice ``2|A∩G| / (|A| + |G|)`` of the thresholded prediction."""

    def __init__(self, threshold: float = 0.5, name: str = "dice", **kwargs):
        super().__init__(threshold, name=name, **kwargs)

    def _score(self, inter, size_true, size_pred):
        denom = size_true + size_pred
        return ops.where(denom > 0, 2.0 * inter / ops.maximum(denom, 1.0), 1.0)


@keras.saving.register_keras_serializable(package="tf_bus")
class IoUScore(_PerImageOverlap):
    """Mean per-image Jaccard ``|A∩G| / |A∪G|`` of the thresholded prediction."""

    def __init__(self, threshold: float = 0.5, name: str = "iou", **kwargs):
        super().__init__(threshold, name=name, **kwargs)

    def _score(self, inter, size_true, size_pred):
        union = size_true + size_pred - inter
        return ops.where(union > 0, inter / ops.maximum(union, 1.0), 1.0)
