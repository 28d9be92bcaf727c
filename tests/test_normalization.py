"""tf_bus.models.normalization.BatchNormalization (the fused one) computes what
keras.layers.BatchNormalization computes, and reads the weights Keras' layer saved."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from tf_bus.models.normalization import BatchNormalization as FusedBatchNormalization
from tf_bus.models.unet import UNet


def _pair(policy: str, **kwargs):
    """A Keras BN and a fused BN with the same (non-trivial) weights, built for (4, 6, 5, 3)."""
    keras_bn = layers.BatchNormalization(dtype=policy, **kwargs)
    fused_bn = FusedBatchNormalization(dtype=policy, **kwargs)
    for bn in (keras_bn, fused_bn):
        bn.build((4, 6, 5, 3))
    rng = np.random.default_rng(1)
    weights = [rng.normal(1.0, 0.3, 3), rng.normal(0.0, 0.3, 3), rng.normal(0, 1, 3), rng.uniform(0.5, 2, 3)]
    weights = [w.astype("float32") for w in weights][: len(keras_bn.get_weights())]
    for bn in (keras_bn, fused_bn):
        bn.set_weights(weights)
    return keras_bn, fused_bn


def _train_step(bn, x):
    x = tf.constant(x)
    w = tf.constant(np.random.default_rng(4).normal(size=x.shape).astype("float32"))  # a loss with nonzero gradients
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = bn(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * w)
    grads = tape.gradient(loss, [x] + bn.trainable_variables)
    return y, grads


CASES = [
    # (dtype policy, layer kwargs, tolerance)
    ("float32", {}, 1e-4),
    ("float32", {"momentum": 0.9, "epsilon": 1e-5}, 1e-4),
    ("float32", {"center": False, "scale": False}, 1e-4),
    ("mixed_bfloat16", {"momentum": 0.9}, 3e-2),
]


@pytest.mark.parametrize("policy,kwargs,tol", CASES)
def test_training_step_matches_keras_batch_normalization(policy, kwargs, tol):
    keras_bn, fused_bn = _pair(policy, **kwargs)
    x = np.random.default_rng(2).normal(3.0, 2.0, (4, 6, 5, 3)).astype("float32")
    y_keras, g_keras = _train_step(keras_bn, x)
    y_fused, g_fused = _train_step(fused_bn, x)
    assert y_fused.dtype == y_keras.dtype == keras_bn.compute_dtype
    np.testing.assert_allclose(np.float32(y_fused), np.float32(y_keras), atol=tol, rtol=tol)
    assert len(g_fused) == len(g_keras)
    for a, b in zip(g_fused, g_keras):
        scale = max(1.0, float(np.abs(np.float32(b)).max()))
        np.testing.assert_allclose(np.float32(a) / scale, np.float32(b) / scale, atol=tol)
    # The moving statistics follow Keras' rule (biased batch variance), not the kernel's.
    np.testing.assert_allclose(fused_bn.moving_mean.numpy(), keras_bn.moving_mean.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fused_bn.moving_variance.numpy(), keras_bn.moving_variance.numpy(), rtol=1e-4, atol=1e-4)
    assert not np.allclose(fused_bn.moving_mean.numpy(), _pair(policy, **kwargs)[1].moving_mean.numpy())  # it moved
    # Inference is the parent's computation.
    np.testing.assert_allclose(np.float32(fused_bn(x, training=False)), np.float32(keras_bn(x, training=False)), atol=tol)


def test_the_training_step_runs_the_fused_kernel():
    bn = FusedBatchNormalization()
    bn.build((2, 4, 4, 3))
    graph = tf.function(lambda x: bn(x, training=True)).get_concrete_function(tf.TensorSpec((2, 4, 4, 3))).graph
    ops = {op.type for op in graph.get_operations()}
    assert any(t.startswith("FusedBatchNorm") for t in ops), ops
    assert "SquaredDifference" not in ops


@pytest.mark.parametrize("kwargs,x_shape", [({"synchronized": True}, (4, 6, 5, 3)), ({"axis": 1}, (4, 3, 5, 6)),
                                            ({}, (4, 7, 3))])
def test_cases_the_kernel_does_not_cover_fall_back_to_keras(kwargs, x_shape):
    x = np.random.default_rng(3).normal(size=x_shape).astype("float32")
    keras_bn, fused_bn = layers.BatchNormalization(**kwargs), FusedBatchNormalization(**kwargs)
    np.testing.assert_allclose(fused_bn(x, training=True).numpy(), keras_bn(x, training=True).numpy(), atol=1e-5)
    graph = tf.function(lambda x: fused_bn(x, training=True)).get_concrete_function(tf.TensorSpec(x_shape)).graph
    assert not any(op.type.startswith("FusedBatchNorm") for op in graph.get_operations())


def test_config_round_trip_and_the_unet_uses_it(tmp_path):
    bn = FusedBatchNormalization(momentum=0.8, epsilon=1e-4, name="bn")
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(bn))
    assert type(again) is FusedBatchNormalization and again.get_config() == bn.get_config()
    model = UNet(image_size=(16, 16), channels=1, depth=1, base_filters=4)
    assert all(type(layer) is FusedBatchNormalization for layer in model.layers if "_bn" in layer.name)
    assert sum("_bn" in layer.name for layer in model.layers) == 6  # down0, bottleneck, up0: two each


def test_a_unet_saved_with_keras_batch_normalization_loads_with_its_weights(tmp_path):
    """U-Nets saved before the fused layer (Keras' own BatchNormalization) still load, weights and all."""
    old = UNet(image_size=(16, 16), channels=1, depth=1, base_filters=4, fused_batch_norm=False)
    assert type(old.get_layer("down0_bn1")) is layers.BatchNormalization
    x = np.random.default_rng(5).random((4, 16, 16, 1)).astype("float32")
    old.compile(optimizer="adam", loss="binary_crossentropy")
    old.fit(x, (x > 0.5).astype("float32"), epochs=1, verbose=0)  # moving statistics away from 0 and 1
    config = old.get_config()
    del config["fused_batch_norm"]  # as files written before the option exist
    new = UNet.from_config(config)
    new.load_weights(_saved_weights(old, tmp_path))
    assert type(new.get_layer("down0_bn1")) is FusedBatchNormalization
    np.testing.assert_allclose(new.get_layer("up0_bn2").moving_variance.numpy(),
                               old.get_layer("up0_bn2").moving_variance.numpy())
    np.testing.assert_allclose(new.predict(x, verbose=0), old.predict(x, verbose=0), atol=1e-6)


def _saved_weights(model, tmp_path):
    path = tmp_path / "old.weights.h5"
    model.save_weights(path)
    return path
