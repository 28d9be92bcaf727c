"""The ResNet lesion classifier (benign / malignant / normal): ResNet50/101, or resnet14/26.

``build_classifier`` wraps ``keras.applications`` ResNet50 or ResNet101 (He et al.,
"Deep Residual Learning for Image Recognition", CVPR 2016, arXiv:1512.03385), or the
smaller resnet14 / resnet26 built here from the same bottleneck blocks with the same layer
names (``bottleneck_resnet``), with the preprocessing inside the model, so the exported
model takes raw pixels:

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

from tf_bus.config import BACKBONE_BLOCKS, BACKBONES, CLASS_NAMES, IMAGENET_BACKBONES
from tf_bus.data.busi import TfBusError
from tf_bus.models import normalization

#: Residual stages of keras.applications ResNets, bottom to top (layer name prefixes).
STAGES = ("conv2", "conv3", "conv4", "conv5")
#: keras.applications' model of each ImageNet backbone, and its weights file.
_KERAS_APPS = {"resnet50": "ResNet50", "resnet101": "ResNet101"}
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
    if str(weights) == "imagenet" and backbone not in IMAGENET_BACKBONES:
        raise TfBusError(
            f"There are no ImageNet weights for {backbone}: keras.applications ships them for "
            f"{' and '.join(IMAGENET_BACKBONES)} only. Pass --weights none (from scratch), a weights file of a "
            f"{backbone} backbone (e.g. saved by `model.get_layer('backbone').save_weights(...)` from a run's "
            f"best.keras), or choose --backbone resnet50."
        )
    if str(weights) == "imagenet":
        cached = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / _WEIGHT_FILES[backbone]
        if cached.exists() or _imagenet_reachable():
            return "imagenet"
        raise TfBusError(
            f"ImageNet weights for {backbone} cannot be downloaded here (no route to "
            f"{_WEIGHTS_HOST[0]}) and are not cached at {cached}. On a machine with internet run "
            f"`python -c \"import keras; keras.applications.{_KERAS_APPS[backbone]}"
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


@keras.saving.register_keras_serializable(package="tf_bus")
class LesionMaskLoss(layers.Layer):
    """Adds the lesion head's loss to the model and passes the class probabilities through.

    Inputs: ``[probabilities, mask_logits (B, h, w, 1), mask (B, H, W, 1) in {0, 1},
    known (B,)]``. The true mask is area-resized to the head's (h, w), giving soft
    targets; the loss per image is BCE (from logits) + soft Dice, counted only where
    ``known`` is 1, averaged over the batch and scaled by ``weight``.
    """

    def __init__(self, weight: float = 1.0, smooth: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.weight = float(weight)
        self.smooth = float(smooth)

    def call(self, probabilities, mask_logits, mask, known):
        logits = ops.cast(mask_logits, "float32")
        target = ops.image.resize(ops.cast(mask, "float32"), ops.shape(logits)[1:3], interpolation="area")
        bce = ops.mean(ops.binary_crossentropy(target, logits, from_logits=True), axis=(1, 2, 3))
        p = ops.sigmoid(logits)
        inter = ops.sum(p * target, axis=(1, 2, 3))
        dice = 1.0 - (2.0 * inter + self.smooth) / (ops.sum(p, axis=(1, 2, 3)) + ops.sum(target, axis=(1, 2, 3))
                                                     + self.smooth)
        known = ops.reshape(ops.cast(known, "float32"), (-1,))
        self.add_loss(self.weight * ops.mean((bce + dice) * known))
        return probabilities

    def compute_output_spec(self, probabilities, *args):
        return keras.KerasTensor(probabilities.shape, dtype=probabilities.dtype)

    def get_config(self):
        return {**super().get_config(), "weight": self.weight, "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="tf_bus")
class LesionAttentionPool(layers.Layer):
    """Pools features under the predicted lesion: mask-guided attention pooling.

    Inputs: ``[features (B, h, w, C), mask_logits (B, h, w, 1)]`` at the same stride.
    Output (B, C + 1): the features averaged with the lesion probability ``p`` as weights,
    ``sum(f * p) / (sum(p) + smooth)`` (``smooth`` in pixels: where the head sees no lesion
    the pooled vector fades to 0, itself a sign of a normal image), and the lesion presence
    ``max(p)``. Global average pooling dilutes a small lesion over the whole image; this
    keeps the lesion's own features for benign versus malignant.
    """

    def __init__(self, smooth: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.smooth = float(smooth)

    def call(self, features, mask_logits):
        p = ops.sigmoid(ops.cast(mask_logits, "float32"))
        f = ops.cast(features, "float32")
        pooled = ops.sum(f * p, axis=(1, 2)) / (ops.sum(p, axis=(1, 2)) + self.smooth)
        presence = ops.max(p, axis=(1, 2))
        return ops.cast(ops.concatenate([pooled, presence], axis=-1), self.compute_dtype)

    def compute_output_shape(self, features_shape, mask_logits_shape):
        return (features_shape[0], features_shape[-1] + 1)

    def get_config(self):
        return {**super().get_config(), "smooth": self.smooth}


def _bottleneck_block(x, filters: int, stride: int, shortcut: bool, name: str):
    """keras.applications' ``residual_block_v1`` (same layers, names and configs)."""
    if shortcut:
        skip = layers.Conv2D(4 * filters, 1, strides=stride, name=f"{name}_0_conv")(x)
        skip = layers.BatchNormalization(axis=3, epsilon=1.001e-5, name=f"{name}_0_bn")(skip)
    else:
        skip = x
    x = layers.Conv2D(filters, 1, strides=stride, name=f"{name}_1_conv")(x)
    x = layers.BatchNormalization(axis=3, epsilon=1.001e-5, name=f"{name}_1_bn")(x)
    x = layers.Activation("relu", name=f"{name}_1_relu")(x)
    x = layers.Conv2D(filters, 3, padding="SAME", name=f"{name}_2_conv")(x)
    x = layers.BatchNormalization(axis=3, epsilon=1.001e-5, name=f"{name}_2_bn")(x)
    x = layers.Activation("relu", name=f"{name}_2_relu")(x)
    x = layers.Conv2D(4 * filters, 1, name=f"{name}_3_conv")(x)
    x = layers.BatchNormalization(axis=3, epsilon=1.001e-5, name=f"{name}_3_bn")(x)
    x = layers.Add(name=f"{name}_add")([skip, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


def bottleneck_resnet(blocks: tuple[int, int, int, int], input_shape: tuple[int, int, int],
                      name: str = "backbone") -> keras.Model:
    """A ResNet v1 with ``blocks`` bottleneck blocks in its stages conv2..conv5, built the
    way ``keras.applications.ResNet50(include_top=False)`` is (a 7x7 stem, max pooling,
    stages of 64/128/256/512 bottleneck filters, stride 2 from conv3 on), with the same
    layer names: ``blocks=(3, 4, 6, 3)`` is ResNet50 layer for layer (tested), and
    ``(1, 1, 1, 1)`` / ``(2, 2, 2, 2)`` are resnet14 / resnet26. Channels-last."""
    inputs = keras.Input(input_shape)
    x = layers.ZeroPadding2D(((3, 3), (3, 3)), name="conv1_pad")(inputs)
    x = layers.Conv2D(64, 7, strides=2, name="conv1_conv")(x)
    x = layers.BatchNormalization(axis=3, epsilon=1.001e-5, name="conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.ZeroPadding2D(((1, 1), (1, 1)), name="pool1_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    for stage, (prefix, filters, n) in enumerate(zip(STAGES, (64, 128, 256, 512), blocks)):
        for b in range(1, n + 1):
            x = _bottleneck_block(x, filters, stride=2 if b == 1 and stage > 0 else 1, shortcut=b == 1,
                                  name=f"{prefix}_block{b}")
    return keras.Model(inputs, x, name=name)


def _backbone(backbone: str, weights: str | None, input_shape: tuple[int, int, int]) -> keras.Model:
    """The backbone model named ``backbone``, with ``weights`` (resolved) loaded."""
    if backbone in IMAGENET_BACKBONES:
        app = getattr(keras.applications, _KERAS_APPS[backbone])
        return app(include_top=False, weights=weights, input_shape=input_shape, name="backbone")
    base = bottleneck_resnet(BACKBONE_BLOCKS[backbone], input_shape)
    if weights is not None:
        base.load_weights(weights)
    return base


def _stage_outputs(base: keras.Model) -> keras.Model:
    """The backbone with its conv4 (stride 16) output as a second output, for the lesion head."""
    conv4 = [l for l in base.layers if l.name.startswith("conv4_") and l.name.endswith("_out")][-1]
    return keras.Model(base.inputs, [base.output, conv4.output], name="backbone")


def _with_fused_batch_norm(base: keras.Model) -> keras.Model:
    """``base`` rebuilt with ``tf_bus.models.normalization.BatchNormalization`` for Keras'
    BatchNormalization layers (same names, configs and weights)."""
    def clone(layer):
        cls = normalization.BatchNormalization if type(layer) is layers.BatchNormalization else type(layer)
        return cls.from_config(layer.get_config())

    inputs = keras.Input(batch_shape=base.input.shape, name=base.layers[0].name)
    fused = keras.models.clone_model(base, input_tensors=inputs, clone_function=clone)
    fused.set_weights(base.get_weights())
    return fused


def build_classifier(
    backbone: str = "resnet50",
    weights: str | os.PathLike | None = None,
    image_size: tuple[int, int] = (224, 224),
    channels: int = 3,
    dropout: float = 0.3,
    num_classes: int = len(CLASS_NAMES),
    mask_loss_weight: float = 0.0,
    bn_momentum: float = 0.9,
    lesion_pooling: bool = False,
    fused_batch_norm: bool = True,
) -> keras.Model:
    """Builds the classifier; see the module docstring.

    Args:
        backbone: one of ``BACKBONES``: ``resnet50``, ``resnet101`` (keras.applications), or
            ``resnet14`` / ``resnet26`` (``bottleneck_resnet``).
        weights: ``"imagenet"`` (resnet50/101), a path to a weights file for the backbone
            (``include_top=False``), or None.
        image_size: (height, width) of the input.
        channels: 1 (grey, replicated inside) or 3.
        dropout: dropout rate before the softmax.
        num_classes: output classes.
        mask_loss_weight: above 0, the training model of the multi-task variant: a lesion
            head (conv4 and conv5 features, fused at stride 16, as in a feature pyramid)
            predicts the lesion mask, and its loss (``LesionMaskLoss``, this weight) joins
            the classification loss. That model takes a dict ``{"image", "lesion_mask",
            "mask_known"}`` and outputs the class probabilities; ``inference_model`` gives
            the image-only classifier (what is saved, evaluated and served).
        lesion_pooling: with the lesion head, the class head also sees the conv4
            features pooled under the predicted lesion and the lesion presence
            (``LesionAttentionPool``), next to the global average of conv5; the served
            classifier then runs the lesion head too.
        bn_momentum: BatchNormalization momentum of a from-scratch backbone (no
            ``weights``). keras.applications uses 0.99: with a few dozen steps an epoch
            its moving statistics lag the weights for epochs, and the inference-mode
            model predicts one class (what we saw on BUSI). 0.9 is PyTorch's default.
            Pre-trained backbones keep 0.99 (their BatchNorm stays frozen anyway).
        fused_batch_norm: the backbone's BatchNormalization layers become
            ``tf_bus.models.normalization.BatchNormalization`` (same weights; trained through
            TensorFlow's fused kernel: ResNet50 trained 1.5x to 2.2x faster in mixed_bfloat16 on a
            CPU). False keeps keras.applications' layers.

    Returns:
        A functional ``keras.Model`` named ``"<backbone>_classifier"`` with the backbone
        as the layer named ``backbone`` and the output layer ``probabilities``.
    """
    if channels not in (1, 3):
        raise ValueError(f"`channels` must be 1 or 3. Received: channels={channels}")
    resolved = resolve_weights(backbone, weights)
    try:
        base = _backbone(backbone, resolved, (*image_size, 3))
    except (OSError, ValueError) as e:
        if resolved is None:
            raise
        if backbone in IMAGENET_BACKBONES:
            what = (f"a Keras weights file of keras.applications.{_KERAS_APPS[backbone]}(include_top=False), e.g. "
                    f"{_WEIGHT_FILES[backbone]}")
        else:
            what = f"a weights file of a {backbone} backbone (`model.get_layer('backbone').save_weights(...)`)"
        raise TfBusError(
            f"{resolved}: cannot load it as {backbone} backbone weights ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"Pass {what}, or --weights none."
        ) from None

    if fused_batch_norm:
        base = _with_fused_batch_norm(base)
    if resolved is None:
        for layer in base.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = bn_momentum
    inputs = keras.Input((*image_size, channels), name="image")
    x = inputs
    if channels == 1:
        x = layers.Concatenate(name="grey_to_rgb")([x, x, x])
    x = ResNetPreprocess(name="resnet_preprocess")(x)
    if mask_loss_weight > 0:
        x, c4 = _stage_outputs(base)(x)
    else:
        x = base(x)
    features = x
    pooled = layers.GlobalAveragePooling2D(name="pool")(features)
    if mask_loss_weight > 0:
        h4, w4 = c4.shape[1], c4.shape[2]
        top = layers.Conv2D(64, 1, name="lesion_lateral5")(features)
        top = layers.Resizing(h4, w4, interpolation="bilinear", name="lesion_up5")(top)
        m = layers.Add(name="lesion_fuse")([layers.Conv2D(64, 1, name="lesion_lateral4")(c4), top])
        m = layers.Activation("relu", name="lesion_relu")(m)
        m = layers.Conv2D(64, 3, padding="same", activation="relu", name="lesion_conv")(m)
        logits = layers.Conv2D(1, 1, dtype="float32", name="lesion_logits")(m)
        if lesion_pooling:
            lesion = LesionAttentionPool(name="lesion_pool")(c4, logits)
            pooled = layers.Concatenate(name="pool_concat")([pooled, lesion])
    x = layers.Dropout(dropout, name="head_dropout")(pooled)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    if mask_loss_weight <= 0:
        return keras.Model(inputs, outputs, name=f"{backbone}_classifier")
    mask_in = keras.Input((*image_size, 1), name="lesion_mask")
    known_in = keras.Input((), name="mask_known")
    outputs = LesionMaskLoss(mask_loss_weight, name="lesion_loss")(outputs, logits, mask_in, known_in)
    return keras.Model({"image": inputs, "lesion_mask": mask_in, "mask_known": known_in}, outputs,
                       name=f"{backbone}_lesion_classifier")


def inference_model(model: keras.Model) -> keras.Model:
    """The image -> class probabilities classifier of a model from ``build_classifier``:
    the model itself, or, for the lesion-head training model, the classifier sharing its
    layers (the lesion head is dropped unless ``lesion_pooling`` feeds the class head)."""
    if not isinstance(model.input, dict):
        return model
    backbone = model.name.replace("_lesion_classifier", "")
    return keras.Model(model.input["image"], model.get_layer("probabilities").output, name=f"{backbone}_classifier")


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
