"""U-Net for lesion masks (Ronneberger, Fischer, Brox: "U-Net: Convolutional Networks
for Biomedical Image Segmentation", MICCAI 2015, arXiv:1505.04597).

Contracting path of ``depth`` levels (two 3x3 convs, then 2x2 max-pool, filters doubled
each level), a bottleneck, and an expanding path (up-sampling, concatenation with the
skip of the same level, two 3x3 convs), ending in a 1x1 conv with a sigmoid.
``padding="same"`` keeps the output at the input size; ``padding="valid"`` is the paper's
unpadded variant, where skips are centre-cropped and the output is smaller than the input.

Two options add attention, both off by default:

- ``attention_gates``: each skip passes an additive attention gate before the
  concatenation (Oktay et al., "Attention U-Net: Learning Where to Look for the
  Pancreas", MIDL 2018, arXiv:1804.03999): the decoder's up-sampled features say where
  the skip's fine features count, so responses far from the lesion can be damped.
- ``transformer_blocks``: pre-norm transformer blocks (multi-head self-attention over the
  bottleneck's positions, then an MLP) after the bottleneck's convolutions, as TransUNet
  (Chen et al. 2021, arXiv:2102.04306) does with a from-scratch encoder here. Every position
  of the coarsest map attends to every other, so distant regions can be compared. The
  position is encoded by a depthwise 3x3 convolution before each block (Chu et al.,
  "Conditional Positional Encodings for Vision Transformers", ICLR 2023), which works at
  any image size.
"""

from __future__ import annotations

import keras
from keras import layers

from tf_bus.config import check_deep_supervision, check_unet_arguments
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


def apply_attention_gate(skip, gate, *, filters: int, name: str):
    """Additive attention gate (Oktay et al. 2018): ``skip * sigmoid(psi(relu(theta(skip) + phi(gate))))``.

    ``gate`` is the decoder's up-sampled map at the skip's resolution; ``theta``, ``phi`` and
    ``psi`` are 1x1 convolutions (``filters`` channels, then one). Returns the skip scaled
    per position by a coefficient in (0, 1); the coefficients are the layer ``{name}_alpha``.
    """
    theta = layers.Conv2D(filters, 1, use_bias=False, kernel_initializer="he_normal", name=f"{name}_theta")(skip)
    phi = layers.Conv2D(filters, 1, kernel_initializer="he_normal", name=f"{name}_phi")(gate)
    x = layers.Add(name=f"{name}_add")([theta, phi])
    x = layers.Activation("relu", name=f"{name}_relu")(x)
    alpha = layers.Conv2D(1, 1, activation="sigmoid", name=f"{name}_alpha")(x)
    return layers.Multiply(name=f"{name}_gate")([skip, alpha])


@keras.saving.register_keras_serializable(package="tf_bus")
class TransformerBlock(layers.Layer):
    """A pre-norm transformer block over the positions of a (B, H, W, C) map.

    ``x + dwconv3x3(x)`` (conditional position encoding), then over the H*W tokens
    ``t + g1 * MHSA(LN(t))`` and ``t + g2 * MLP(LN(t))`` (GELU, ``mlp_ratio * C`` hidden
    units); returns (B, H, W, C). Works for any H and W.

    The block starts as the identity: the depthwise kernel starts at zero and ``g1``, ``g2``
    are per-channel scales starting at ``layer_scale`` (LayerScale, Touvron et al., "Going
    deeper with Image Transformers", ICCV 2021), so a U-Net with these blocks first trains
    like one without. Without LayerScale, two blocks slowed the U-Net's first epochs on BUSI
    (README, "Attention").

    Args:
        num_heads: attention heads; C must be divisible by it.
        mlp_ratio: hidden width of the MLP over C.
        dropout: dropout of the attention weights and of the MLP's output.
        layer_scale: initial value of ``g1`` and ``g2``.
    """

    def __init__(self, num_heads: int = 4, mlp_ratio: int = 2, dropout: float = 0.0, layer_scale: float = 1e-4,
                 **kwargs):
        super().__init__(**kwargs)
        if num_heads < 1:
            raise ValueError(f"`num_heads` must be >= 1. Received: num_heads={num_heads}")
        if mlp_ratio < 1:
            raise ValueError(f"`mlp_ratio` must be >= 1. Received: mlp_ratio={mlp_ratio}")
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.dropout = dropout
        self.layer_scale = layer_scale

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels % self.num_heads:
            raise ValueError(f"The block's {channels} channels must be divisible by `num_heads`={self.num_heads}.")
        self.position = layers.DepthwiseConv2D(3, padding="same", use_bias=False, depthwise_initializer="zeros",
                                               dtype=self.dtype_policy, name="position")
        self.position.build(input_shape)
        tokens = (None, None, channels)
        self.norm1 = layers.LayerNormalization(epsilon=1e-6, dtype=self.dtype_policy, name="norm1")
        self.norm1.build(tokens)
        self.attention = layers.MultiHeadAttention(self.num_heads, channels // self.num_heads, dropout=self.dropout,
                                                   dtype=self.dtype_policy, name="attention")
        self.attention.build(tokens, tokens)
        self.norm2 = layers.LayerNormalization(epsilon=1e-6, dtype=self.dtype_policy, name="norm2")
        self.norm2.build(tokens)
        self.mlp_hidden = layers.Dense(self.mlp_ratio * channels, activation="gelu", dtype=self.dtype_policy,
                                       name="mlp_hidden")
        self.mlp_hidden.build(tokens)
        self.mlp_out = layers.Dense(channels, dtype=self.dtype_policy, name="mlp_out")
        self.mlp_out.build((None, None, self.mlp_ratio * channels))
        self.mlp_dropout = layers.Dropout(self.dropout, name="mlp_dropout")
        scale = keras.initializers.Constant(self.layer_scale)
        self.gamma_attention = self.add_weight(shape=(channels,), initializer=scale, name="gamma_attention")
        self.gamma_mlp = self.add_weight(shape=(channels,), initializer=scale, name="gamma_mlp")
        super().build(input_shape)

    def call(self, x, training=None):
        x = x + self.position(x)
        shape = keras.ops.shape(x)
        tokens = keras.ops.reshape(x, (shape[0], shape[1] * shape[2], shape[3]))
        y = self.norm1(tokens)
        tokens = tokens + self.gamma_attention * self.attention(y, y, training=training)
        y = self.mlp_out(self.mlp_hidden(self.norm2(tokens)))
        tokens = tokens + self.gamma_mlp * self.mlp_dropout(y, training=training)
        return keras.ops.reshape(tokens, shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio,
                "dropout": self.dropout, "layer_scale": self.layer_scale}


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
        attention_gates: pass each skip through an additive attention gate
            (``apply_attention_gate``) gated by the decoder's up-sampled map.
        transformer_blocks: ``TransformerBlock``s after the bottleneck's convolutions (0: none).
        transformer_heads: their attention heads; ``base_filters * 2**depth`` must be
            divisible by it.

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
        attention_gates: bool = False,
        transformer_blocks: int = 0,
        transformer_heads: int = 4,
        **kwargs,
    ):
        image_size = tuple(image_size)
        check_unet_arguments(image_size=image_size, channels=channels, depth=depth, base_filters=base_filters,
                             upsampling=upsampling, padding=padding, transformer_blocks=transformer_blocks,
                             transformer_heads=transformer_heads)

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
        for block in range(transformer_blocks):
            x = TransformerBlock(transformer_heads, dropout=dropout, name=f"bottleneck_transformer{block}")(x)
        for level in reversed(range(depth)):
            filters = base_filters * 2 ** level
            if upsampling == "transpose":
                x = layers.Conv2DTranspose(filters, 2, strides=2, name=f"up{level}_transpose")(x)
            else:
                x = layers.UpSampling2D(2, interpolation="bilinear", name=f"up{level}_resize")(x)
                x = layers.Conv2D(filters, 3, padding="same", name=f"up{level}_conv")(x)
            skip = _center_crop(skips[level], x, name=f"up{level}_crop") if padding == "valid" else skips[level]
            if attention_gates:
                skip = apply_attention_gate(skip, x, filters=max(filters // 2, 1), name=f"up{level}_attention")
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
        self.attention_gates = attention_gates
        self.transformer_blocks = transformer_blocks
        self.transformer_heads = transformer_heads

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
            "attention_gates": self.attention_gates,
            "transformer_blocks": self.transformer_blocks,
            "transformer_heads": self.transformer_heads,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def deep_supervision_weights(levels: int) -> list[float]:
    """The loss weights of the full-resolution output and of ``levels`` auxiliary outputs:
    halved per level, then normalised to sum 1 (as nnU-Net weighs its deep supervision)."""
    raw = [0.5 ** level for level in range(levels + 1)]
    return [w / sum(raw) for w in raw]


@keras.saving.register_keras_serializable(package="tf_bus")
class DeepSupervision(keras.Model):
    """Trains a ``UNet`` with auxiliary losses on its decoder's coarser levels (deep supervision).

    A 1x1 convolution with a sigmoid (``aux{level}_mask``) reads the output of the decoder
    block ``up{level}`` for ``level`` = 1..``levels`` (1/2, 1/4, ... of the input size). The
    training loss is the compiled loss of the U-Net's own output and of each auxiliary
    output against the true mask average-pooled to its size (the share of lesion in each
    cell), weighted by ``deep_supervision_weights`` (Lee et al., "Deeply-Supervised Nets",
    AISTATS 2015; nnU-Net, Isensee et al. 2021). The coarse levels get a gradient of their
    own instead of only what reaches them through the finer ones.

    Calling the model, evaluating it and its metrics use the U-Net's output alone, so
    validation Dice means what it means without deep supervision. The heads serve training
    only: save ``model.unet`` (``best.keras``, ``last.keras``), which is a plain ``UNet``.

    Args:
        unet: a ``UNet`` with ``padding="same"``.
        levels: auxiliary outputs, 1 to ``unet.depth - 1``.
    """

    def __init__(self, unet: UNet, levels: int = 2, **kwargs):
        if isinstance(unet, dict):  # from_config
            unet = keras.saving.deserialize_keras_object(unet)
        if levels < 1:
            raise ValueError(f"`levels` must be >= 1 (with none the model is the U-Net itself). Received: levels={levels}")
        check_deep_supervision(levels, depth=unet.depth, padding=unet.padding)
        super().__init__(**kwargs)
        self.unet = unet
        self.levels = levels
        self.heads = [layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name=f"aux{level}_mask")
                      for level in range(1, levels + 1)]
        aux = [head(unet.get_layer(f"up{level}_relu2").output) for level, head in enumerate(self.heads, start=1)]
        self.supervised = keras.Model(unet.input, [unet.output, *aux], name=f"{unet.name}_supervised")
        self.level_weights = deep_supervision_weights(levels)
        self.built = True  # every layer is built above

    def call(self, x, training=None):
        return self.unet(x, training=training)

    def supervised_loss(self, x, y, sample_weight=None, training=True):
        """The weighted loss of every output, and the U-Net's own output (for the metrics)."""
        if not isinstance(self.loss, keras.losses.Loss):  # it is called on the auxiliary outputs too
            raise TypeError("DeepSupervision needs the `loss` given to compile() as a keras.losses.Loss instance, "
                            f"e.g. tf_bus.models.losses.get_loss('bce_dice'). Received: loss={self.loss!r}")
        outputs = self.supervised(x, training=training)
        loss = self.level_weights[0] * self.compute_loss(x=x, y=y, y_pred=outputs[0], sample_weight=sample_weight,
                                                        training=training)
        for level, (weight, pred) in enumerate(zip(self.level_weights[1:], outputs[1:]), start=1):
            target = keras.ops.average_pool(keras.ops.cast(y, "float32"), 2 ** level, strides=2 ** level)
            loss = loss + weight * self.loss(target, pred, sample_weight=sample_weight)
        return loss, outputs[0]

    def train_step(self, data):
        # Keras' TensorFlow train_step, with the forward pass and loss of ``supervised_loss``.
        import tensorflow as tf
        from keras.src.losses import loss as loss_module  # Keras' own undoing of the per-replica loss scaling

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            loss, y_pred = self.supervised_loss(x, y, sample_weight)
            self._loss_tracker.update_state(loss_module.unscale_loss_for_distribution(loss),
                                            sample_weight=tf.shape(x)[0])
            loss = self.optimizer.scale_loss(loss)
        trainable = self.trainable_weights
        self.optimizer.apply_gradients(zip(tape.gradient(loss, trainable), trainable))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, "unet": keras.saving.serialize_keras_object(self.unet),
                "levels": self.levels}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
