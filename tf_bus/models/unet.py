"""U-Net for lesion masks (Ronneberger, Fischer, Brox: "U-Net: Convolutional Networks
for Biomedical Image Segmentation", MICCAI 2015, arXiv:1505.04597).

Contracting path of ``depth`` levels (two 3x3 convs, then 2x2 max-pool, filters doubled
each level), a bottleneck, and an expanding path (up-sampling, concatenation with the
skip of the same level, two 3x3 convs), ending in a 1x1 conv with a sigmoid.
``padding="same"`` keeps the output at the input size; ``padding="valid"`` is the paper's
unpadded variant, where skips are centre-cropped and the output is smaller than the input.
"""

from __future__ import annotations

import keras
from keras import layers

from tf_bus.models import normalization


def apply_conv_block(x, filters: int, *, batch_norm: bool, dropout: float, padding: str, name: str,
                     sync_batch_norm: bool = False, fused_batch_norm: bool = True):
    """Two 3x3 convolutions (+ batch norm) with ReLU; optional dropout at the end.

    With ``fused_batch_norm`` the batch norm is ``tf_bus.models.normalization.BatchNormalization``:
    Keras' layer, trained through TensorFlow's fused kernel (see that module); else Keras' own."""
    norm = normalization.BatchNormalization if fused_batch_norm else layers.BatchNormalization
    for k in (1, 2):
        x = layers.Conv2D(filters, 3, padding=padding, use_bias=not batch_norm,
                          kernel_initializer="he_normal", name=f"{name}_conv{k}")(x)
        if batch_norm:
            x = norm(synchronized=sync_batch_norm, name=f"{name}_bn{k}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{k}")(x)
    if dropout > 0:
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return x


def _center_crop(skip, target, name: str):
    """Crops ``skip`` (B, H, W, C) to the spatial size of ``target`` (static shapes)."""
    dh = skip.shape[1] - target.shape[1]
    dw = skip.shape[2] - target.shape[2]
    if dh == 0 and dw == 0:
        return skip
    return layers.Cropping2D(((dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)), name=name)(skip)


@keras.saving.register_keras_serializable(package="tf_bus")
class UNet(keras.Model):
    """A U-Net mapping images to lesion probabilities.

    Args:
        image_size: (height, width), or (None, None) for any size divisible by
            ``2**depth`` (only with ``padding="same"``).
        channels: input channels, 1 (grey) or 3.
        depth: number of down-sampling levels (the paper: 4).
        base_filters: filters of the first level (the paper: 64), doubled per level.
        batch_norm: batch normalisation after each convolution.
        dropout: dropout rate after the deepest two blocks (0 disables).
        upsampling: ``"transpose"`` (2x2 transposed conv, stride 2) or ``"resize"``
            (bilinear 2x resize + 3x3 conv, which avoids checkerboard artefacts).
        padding: ``"same"`` (output size = input size) or ``"valid"`` (the paper's
            unpadded convolutions with cropped skips; needs a static ``image_size``).
        sync_batch_norm: under a tf.distribute strategy with several replicas, batch
            statistics over the global batch (``synchronized=True``), so that every
            replica and worker keeps the same moving statistics; no effect on one device.
        fused_batch_norm: train the batch norms through TensorFlow's fused kernel
            (``tf_bus.models.normalization.BatchNormalization``: the same arithmetic and
            weights as Keras' layer; U-Net training 1.1x to 1.6x faster on a CPU); False
            uses ``keras.layers.BatchNormalization`` as it is.

    Input: float32 (B, H, W, channels) in [0, 1].
    Output: float32 (B, H', W', 1) probabilities (sigmoid), H' = H for ``"same"``.
    """

    def __init__(
        self,
        image_size=(256, 256),
        channels: int = 3,
        depth: int = 4,
        base_filters: int = 32,
        batch_norm: bool = True,
        dropout: float = 0.1,
        upsampling: str = "transpose",
        padding: str = "same",
        sync_batch_norm: bool = False,
        fused_batch_norm: bool = True,
        **kwargs,
    ):
        image_size = tuple(image_size)
        if channels not in (1, 3):
            raise ValueError(f"`channels` must be 1 or 3. Received: channels={channels}")
        if depth < 1:
            raise ValueError(f"`depth` must be >= 1. Received: depth={depth}")
        if base_filters < 1:
            raise ValueError(f"`base_filters` must be >= 1. Received: base_filters={base_filters}")
        if upsampling not in ("transpose", "resize"):
            raise ValueError(f"`upsampling` must be 'transpose' or 'resize'. Received: upsampling={upsampling!r}")
        if padding not in ("same", "valid"):
            raise ValueError(f"`padding` must be 'same' or 'valid'. Received: padding={padding!r}")
        if padding == "valid" and None in image_size:
            raise ValueError(f"padding='valid' needs a static image_size. Received: image_size={image_size}")
        if padding == "same" and None not in image_size and any(s % 2 ** depth for s in image_size):
            raise ValueError(
                f"With padding='same', image_size must be divisible by 2**depth={2 ** depth}. "
                f"Received: image_size={image_size}"
            )

        inputs = keras.Input(shape=(*image_size, channels), name="image")
        x = inputs
        skips = []
        for level in range(depth):
            x = apply_conv_block(x, base_filters * 2 ** level, batch_norm=batch_norm,
                                 dropout=dropout if level == depth - 1 else 0.0,
                                 padding=padding, name=f"down{level}", sync_batch_norm=sync_batch_norm,
                                 fused_batch_norm=fused_batch_norm)
            skips.append(x)
            x = layers.MaxPooling2D(2, name=f"down{level}_pool")(x)
        x = apply_conv_block(x, base_filters * 2 ** depth, batch_norm=batch_norm, dropout=dropout,
                             padding=padding, name="bottleneck", sync_batch_norm=sync_batch_norm,
                             fused_batch_norm=fused_batch_norm)
        for level in reversed(range(depth)):
            filters = base_filters * 2 ** level
            if upsampling == "transpose":
                x = layers.Conv2DTranspose(filters, 2, strides=2, name=f"up{level}_transpose")(x)
            else:
                x = layers.UpSampling2D(2, interpolation="bilinear", name=f"up{level}_resize")(x)
                x = layers.Conv2D(filters, 3, padding="same", name=f"up{level}_conv")(x)
            skip = _center_crop(skips[level], x, name=f"up{level}_crop") if padding == "valid" else skips[level]
            x = layers.Concatenate(name=f"up{level}_concat")([skip, x])
            x = apply_conv_block(x, filters, batch_norm=batch_norm, dropout=0.0, padding=padding, name=f"up{level}",
                                 sync_batch_norm=sync_batch_norm, fused_batch_norm=fused_batch_norm)
        outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="mask")(x)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        self.image_size = image_size
        self.channels = channels
        self.depth = depth
        self.base_filters = base_filters
        self.batch_norm = batch_norm
        self.dropout = dropout
        self.upsampling = upsampling
        self.padding = padding
        self.sync_batch_norm = sync_batch_norm
        self.fused_batch_norm = fused_batch_norm

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "image_size": self.image_size,
            "channels": self.channels,
            "depth": self.depth,
            "base_filters": self.base_filters,
            "batch_norm": self.batch_norm,
            "dropout": self.dropout,
            "upsampling": self.upsampling,
            "padding": self.padding,
            "sync_batch_norm": self.sync_batch_norm,
            "fused_batch_norm": self.fused_batch_norm,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
