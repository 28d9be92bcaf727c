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
* Boundary BCE + Dice: BCE whose pixels within ``band_radius`` of the true outline weigh
  ``1 + band_weight`` (the border weight map of Ronneberger, Fischer, Brox: "U-Net",
  MICCAI 2015, arXiv:1505.04597, as a band), as a weighted mean, plus soft Dice.
"""

from __future__ import annotations

import keras
from keras import ops

from tf_bus.config import SEGMENTATION_LOSSES


def _flat(y_true, y_pred):
    y_pred = ops.cast(y_pred, "float32")
    y_true = ops.cast(y_true, "float32")
    axes = list(range(1, len(y_pred.shape)))
    return y_true, y_pred, axes


def _pixel_bce(y_true, y_pred):
    """Binary cross-entropy of every pixel (float32 inputs from ``_flat``), probabilities clipped."""
    eps = keras.config.epsilon()
    p = ops.clip(y_pred, eps, 1.0 - eps)
    return -(y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p))


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
        bce = ops.mean(_pixel_bce(y_true, y_pred), axis=axes)
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


@keras.saving.register_keras_serializable(package="tf_bus")
class BoundaryBceDiceLoss(keras.losses.Loss):
    """BCE weighted towards the true outline, plus soft Dice (per image, then the batch mean).

    The band is the morphological gradient of the target: its dilation minus its erosion by a
    ``(2 band_radius + 1)`` square, so the pixels at most ``band_radius`` (chessboard) from
    the outline, inside and out. Their BCE weighs ``1 + band_weight``, every other pixel's 1,
    and the weighted sum is divided by the summed weight, so an image without an outline
    (an empty or full mask) gets the plain BCE.

    Args:
        band_radius: the band's half width in pixels (of the model's output).
        band_weight: the extra weight of a band pixel (0: plain ``bce_dice``).
        smooth: the soft Dice's smoothing term.
    """

    def __init__(self, band_radius: int = 2, band_weight: float = 4.0, smooth: float = 1.0,
                 name: str = "boundary_bce_dice", **kwargs):
        super().__init__(name=name, **kwargs)
        if int(band_radius) != band_radius or band_radius < 1:
            raise ValueError(f"`band_radius` must be a whole number of pixels >= 1. Received: band_radius={band_radius}")
        if band_weight < 0:
            raise ValueError(f"`band_weight` must be >= 0. Received: band_weight={band_weight}")
        self.band_radius, self.band_weight, self.smooth = int(band_radius), float(band_weight), smooth
        self._dice = SoftDiceLoss(smooth, reduction=None)

    def band(self, y_true):
        """The outline band of (B, H, W, 1) targets in [0, 1]: dilation minus erosion."""
        y_true = ops.cast(y_true, "float32")
        size = 2 * self.band_radius + 1
        dilated = ops.max_pool(y_true, size, strides=1, padding="same")
        eroded = 1.0 - ops.max_pool(1.0 - y_true, size, strides=1, padding="same")
        return dilated - eroded

    def call(self, y_true, y_pred):
        y_true, y_pred, axes = _flat(y_true, y_pred)
        weight = 1.0 + self.band_weight * self.band(y_true)
        weighted = ops.sum(weight * _pixel_bce(y_true, y_pred), axis=axes) / ops.sum(weight, axis=axes)
        return weighted + self._dice.call(y_true, y_pred)

    def get_config(self):
        return {**super().get_config(), "band_radius": self.band_radius, "band_weight": self.band_weight,
                "smooth": self.smooth}


LOSSES = SEGMENTATION_LOSSES


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
    if name == "boundary_bce_dice":
        return BoundaryBceDiceLoss()
    raise ValueError(f"Unknown loss. Use one of {', '.join(LOSSES)}. Received: loss={name!r}")
