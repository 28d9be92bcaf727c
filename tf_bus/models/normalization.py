"""Batch normalisation that trains through TensorFlow's fused kernel.

Keras 3's ``BatchNormalization`` computes its training-mode batch statistics and the
normalisation from generic ops (``moments``: mean, squared difference, mean; then
subtract, multiply, add), in float32 even under ``mixed_bfloat16``, so each layer costs a
dozen element-wise passes over the activation and its gradient a dozen more.
``tf.compat.v1.nn.fused_batch_norm`` does the same arithmetic in one kernel forward
(``FusedBatchNormV3``; oneDNN's where oneDNN is on) and one backward, reading bf16
activations directly (statistics in float32). This module's ``BatchNormalization`` uses it
for the training step and is Keras' layer everywhere else: the same weights (gamma, beta,
moving mean and variance), the same inference path, the same moving-average rule (Keras
keeps the *biased* batch variance; the fused kernel returns the unbiased one, which is
rescaled by (n-1)/n).

It keeps Keras' class name on purpose: a ``.keras`` file stores each layer's weights under
a path made from its class name (``layers/batch_normalization_3/vars``), so the same name
keeps the weight files of U-Nets saved before and after this layer interchangeable. It is
registered as ``tf_bus>BatchNormalization``.
"""

from __future__ import annotations

import keras
from keras import layers


@keras.saving.register_keras_serializable(package="tf_bus")
class BatchNormalization(layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` whose training step runs the fused TensorFlow op.

    Takes the same arguments. Falls back to the parent's computation where the fused
    kernel does not apply: another Keras backend, ``synchronized=True`` (cross-replica
    statistics), ``renorm``, a mask, or an axis other than the last of a 4-D input.
    """

    def _fusable(self, inputs, mask) -> bool:
        return (
            keras.backend.backend() == "tensorflow"
            and mask is None
            and not self.synchronized
            and not self.renorm
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
        )

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable and self._fusable(inputs, mask)):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        x = inputs if inputs.dtype in (tf.float32, tf.bfloat16, tf.float16) else tf.cast(inputs, tf.float32)
        channels = x.shape[-1]
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels], tf.float32)
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels], tf.float32)
        y, mean, unbiased = tf.compat.v1.nn.fused_batch_norm(
            x, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True)
        n = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
        variance = unbiased * ((n - 1.0) / tf.maximum(n, 1.0))
        m = self.momentum
        self.moving_mean.assign(self.moving_mean * m + tf.cast(mean, self.moving_mean.dtype) * (1.0 - m))
        self.moving_variance.assign(
            self.moving_variance * m + tf.cast(variance, self.moving_variance.dtype) * (1.0 - m))
        return tf.cast(y, self.compute_dtype)
