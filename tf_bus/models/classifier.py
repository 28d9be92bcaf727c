"""ResNet50/101 lesion classifier (benign / malignant / normal) for fine-tuning.

``build_classifier`` wraps ``keras.applications`` ResNet50 or ResNet101 (He et al.,
"Deep Residual Learning for Image Recognition", CVPR 2016, arXiv:1512.03385) with the
preprocessing inside the model, so the exported model takes raw pixels:

    image (B, H, W, 1 or 3) float32 in [0, 255]
      -> grey replicated to 3 channels -> ResNet "caffe" preprocessing (RGB->BGR, ImageNet
         mean subtracted) -> backbone -> global average pooling -> dropout
      -> Dense(3, softmax, float32): class probabilities (B, 3)

Backbone weights: ``"imagenet"`` (downloaded by Keras; offline this fails fast with a
message saying how to pass a local file), a path to a local weights file, or ``None``
(from scratch). Fine-tuning follows the Keras guide: ``set_trainable_stages`` unfreezes the
top N residual stages but keeps every BatchNormalization layer frozen (inference mode), so
small batches do not wreck the pre-trained statistics.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import keras
from keras import layers, ops

from tf_bus.config import CLASS_NAMES
from tf_bus.data.busi import TfBusError

BACKBONES = ("resnet50", "resnet101")
#: Residual stages of keras.applications ResNets, bottom to top (layer name prefixes).
STAGES = ("conv2", "conv3", "conv4", "conv5")
_WEIGHT_FILES = {
    "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "resnet101": "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5",
}
_WEIGHTS_HOST = ("storage.googleapis.com", 443)


def _imagenet_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(_WEIGHTS_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def resolve_weights(backbone: str, weights: str | os.PathLike | None) -> str | None:
    """Checks the ``weights`` option early and returns what keras.applications takes.

    Raises:
        TfBusError: ``imagenet`` with neither a cached file nor network access (says how
            to pass a local file), or a local path that does not exist.
    """
    if backbone not in BACKBONES:
        raise TfBusError(f"Unknown backbone. Use one of {', '.join(BACKBONES)}. Received: backbone={backbone!r}")
    if weights is None or str(weights).lower() in ("none", ""):
        return None
    if str(weights) == "imagenet":
        cached = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / _WEIGHT_FILES[backbone]
        if cached.exists() or _imagenet_reachable():
            return "imagenet"
        raise TfBusError(
            f"ImageNet weights for {backbone} cannot be downloaded here (no route to "
            f"{_WEIGHTS_HOST[0]}) and are not cached at {cached}. On a machine with internet run "
            f"`python -c \"import keras; keras.applications.{'ResNet50' if backbone == 'resnet50' else 'ResNet101'}"
            f"(weights='imagenet', include_top=False)\"`, copy ~/.keras/models/{_WEIGHT_FILES[backbone]} here, "
            "and pass its path with --weights PATH (or put it in that cache folder); or pass --weights none."
        )
    p = Path(weights).expanduser()
    if not p.is_file():
        raise TfBusError(f"{p}: no such weights file. Pass --weights imagenet, none, or an existing file.")
    return str(p)


@keras.saving.register_keras_serializable(package="tf_bus")
class ResNetPreprocess(layers.Layer):
    """The "caffe" preprocessing of keras.applications ResNets: RGB -> BGR, minus the
    ImageNet channel means. Input (B, H, W, 3) in [0, 255]."""

    MEAN_BGR = (103.939, 116.779, 123.68)

    def call(self, x):
        x = ops.flip(ops.cast(x, self.compute_dtype), axis=-1)
        return x - ops.convert_to_tensor(self.MEAN_BGR, dtype=self.compute_dtype)


def build_classifier(
    backbone: str = "resnet50",
    weights: str | os.PathLike | None = None,
    image_size: tuple[int, int] = (224, 224),
    channels: int = 3,
    dropout: float = 0.3,
    num_classes: int = len(CLASS_NAMES),
) -> keras.Model:
    """Builds the classifier; see the module docstring.

    Args:
        backbone: ``resnet50`` or ``resnet101``.
        weights: ``"imagenet"``, a path to a weights file for the backbone
            (``include_top=False``), or None.
        image_size: (height, width) of the input.
        channels: 1 (grey, replicated inside) or 3.
        dropout: dropout rate before the softmax.
        num_classes: output classes.

    Returns:
        A functional ``keras.Model`` named ``"<backbone>_classifier"`` with the backbone
        as the layer named ``backbone`` and the output layer ``probabilities``.
    """
    if channels not in (1, 3):
        raise ValueError(f"`channels` must be 1 or 3. Received: channels={channels}")
    resolved = resolve_weights(backbone, weights)
    app = keras.applications.ResNet50 if backbone == "resnet50" else keras.applications.ResNet101
    try:
        base = app(include_top=False, weights=resolved, input_shape=(*image_size, 3), name="backbone")
    except (OSError, ValueError) as e:
        if resolved is None:
            raise
        raise TfBusError(
            f"{resolved}: cannot load it as {backbone} backbone weights ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"Pass a Keras weights file of keras.applications.{app.__name__}(include_top=False), e.g. "
            f"{_WEIGHT_FILES[backbone]}, or --weights none."
        ) from None

    inputs = keras.Input((*image_size, channels), name="image")
    x = inputs
    if channels == 1:
        x = layers.Concatenate(name="grey_to_rgb")([x, x, x])
    x = ResNetPreprocess(name="resnet_preprocess")(x)
    x = base(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"{backbone}_classifier")


def set_trainable_stages(model: keras.Model, stages: int | None) -> None:
    """Freezes the backbone but its top ``stages`` residual stages (0: head only;
    4: every stage; the stem stays frozen unless ``stages`` >= 5). BatchNormalization
    layers stay frozen whatever ``stages`` is (fine-tuning pre-trained weights).
    ``stages=None`` makes every layer trainable, BatchNorm included: training from
    scratch, where BatchNorm must learn its statistics. Recompile after calling this."""
    if stages is None:
        model.trainable = True
        for layer in model.get_layer("backbone").layers:
            layer.trainable = True
        return
    if not 0 <= stages <= len(STAGES) + 1:
        raise ValueError(f"`stages` must be within 0..{len(STAGES) + 1}. Received: stages={stages}")
    base = model.get_layer("backbone")
    base.trainable = True
    open_prefixes = STAGES[len(STAGES) - min(stages, len(STAGES)):] if stages else ()
    for layer in base.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = False
        elif stages > len(STAGES):
            layer.trainable = True
        else:
            layer.trainable = bool(open_prefixes) and layer.name.startswith(tuple(p + "_" for p in open_prefixes))
