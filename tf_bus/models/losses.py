"""Segmentation losses on (B, H, W, 1) probabilities and {0, 1} targets.

Every loss is computed per image (sums over H, W, C) and averaged over the batch, so a
small lesion counts as much as a large one.

* Binary cross-entropy: ``keras.losses.BinaryCrossentropy``.
* Soft Dice (Milletari, Navab, Ahmadi: "V-Net", 3DV 2016, arXiv:1606.04797):
  ``1 - (2 sum(p g) + s) / (sum(p) + sum(g) + s)``.
* BCE + Dice: their sum (weights configurable).
* Focal Tversky (Abraham, Khan: "A Novel Focal Tversky Loss Function ...", ISBI 2019,
  arXiv:1810.07842): ``(1 - TI) ** gamma`` with
  ``TI = (sum(p g) + s) / (sum(p g) + alpha sum((1-p) g) + beta sum(p (1-g)) + s)``.
"""

from __future__ import annotations

import keras
from keras import ops


def _flat(y_true, y_pred):
    y_pred = ops.cast(y_pred, "float32")
    y_true = ops.cast(y_true, "float32")
    axes = list(range(1, len(y_pred.shape)))
    return y_true, y_pred, axes


@keras.saving.register_keras_serializable(package="tf_bus")
class SoftDiceLoss(keras.losses.Loss):
    """Soft Dice loss per image, then the batch mean.

    Args:
        smooth: added to numerator and denominator; makes an empty prediction of an
            empty mask a perfect 0 loss and keeps gradients finite.
    """

    def __init__(self, smooth: float = 1.0, name: str = "soft_dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.smooth = smooth

    def call(self, y_true, y_pred):
        y_true, y_pred, axes = _flat(y_true, y_pred)
        inter = ops.sum(y_true * y_pred, axis=axes)
        denom = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
        return 1.0 - (2.0 * inter + self.smooth) / (denom + self.smooth)

    def get_config(self):
        return {**super().get_config(), "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="tf_bus")
class BceDiceLoss(keras.losses.Loss):
    """``bce_weight * BCE + dice_weight * soft Dice`` (per image, then the batch mean)."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0,
                 name: str = "bce_dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.bce_weight, self.dice_weight, self.smooth = bce_weight, dice_weight, smooth
        self._dice = SoftDiceLoss(smooth, reduction=None)

    def call(self, y_true, y_pred):
        y_true, y_pred, axes = _flat(y_true, y_pred)
        eps = keras.config.epsilon()
        p = ops.clip(y_pred, eps, 1.0 - eps)
        bce = -ops.mean(y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p), axis=axes)
        return self.bce_weight * bce + self.dice_weight * self._dice.call(y_true, y_pred)

    def get_config(self):
        return {**super().get_config(), "bce_weight": self.bce_weight, "dice_weight": self.dice_weight,
                "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="tf_bus")
class FocalTverskyLoss(keras.losses.Loss):
    """Focal Tversky loss per image, then the batch mean.

    Args:
        alpha: weight of false negatives (0.7 favours recall, as the paper does).
        beta: weight of false positives.
        gamma: focal exponent (0.75 in the paper).
        smooth: added to numerator and denominator.
    """

    def __init__(self, alpha: float = 0.7, beta: float = 0.3, gamma: float = 0.75, smooth: float = 1.0,
                 name: str = "focal_tversky", **kwargs):
        super().__init__(name=name, **kwargs)
        self.alpha, self.beta, self.gamma, self.smooth = alpha, beta, gamma, smooth

    def call(self, y_true, y_pred):
        y_true, y_pred, axes = _flat(y_true, y_pred)
        tp = ops.sum(y_true * y_pred, axis=axes)
        fn = ops.sum(y_true * (1.0 - y_pred), axis=axes)
        fp = ops.sum((1.0 - y_true) * y_pred, axis=axes)
        ti = (tp + self.smooth) / (tp + self.alpha * fn + self.beta * fp + self.smooth)
        return ops.power(ops.maximum(1.0 - ti, 0.0), self.gamma)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
                "smooth": self.smooth}


LOSSES = ("bce", "dice", "bce_dice", "focal_tversky")


def get_loss(name: str) -> keras.losses.Loss:
    """A loss by name: one of ``LOSSES``."""
    if name == "bce":
        return keras.losses.BinaryCrossentropy(name="bce")
    if name == "dice":
        return SoftDiceLoss()
    if name == "bce_dice":
        return BceDiceLoss()
    if name == "focal_tversky":
        return FocalTverskyLoss()
    raise ValueError(f"Unknown loss. Use one of {', '.join(LOSSES)}. Received: loss={name!r}")
