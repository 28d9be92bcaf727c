"""FusedAdam: Keras's Adam/AdamW arithmetic with one ResourceApplyAdam kernel per variable.

Each case trains the same small model twice from the same weights, once with Keras's own
optimizer and once with FusedAdam, and compares weights and slots after 20 steps (the
kernel's rounding differs from Keras's ops by an ulp or so per step). A ResNet is not
compared: its convolution biases before batch norm have gradients of pure round-off,
which Adam scales to full steps, so Keras against itself with one weight changed by 2e-7
already differs by the learning rate after two steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_bus.models  # noqa: F401  (registers FusedAdam)
from tf_bus.models.optimizers import FusedAdam
from tf_bus.models.schedules import BudgetedCosine
from tf_bus.training.common import make_optimizer


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inputs)  # no round-off gradients
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Activation("tanh")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="dense")(x))


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 6, 6, 2)).astype("float32"), rng.normal(size=(32, 2)).astype("float32")


def _train(optimizer, steps: int = 20, loss_scale: bool = False):
    model = _model()
    if loss_scale:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=2.0 ** 8)
    model.compile(optimizer=optimizer, loss="mse")
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=steps // 4, shuffle=False, verbose=0)
    return model


LR = 1e-2
CASES = {  # name: (Keras's optimizer, FusedAdam, kwargs of _train)
    "adam": (lambda: keras.optimizers.Adam(LR), lambda: FusedAdam(LR), {}),
    "adamw": (lambda: keras.optimizers.AdamW(LR, weight_decay=0.05), lambda: FusedAdam(LR, weight_decay=0.05), {}),
    "adamw, bias and bn excluded": (
        lambda: _excluding(keras.optimizers.AdamW(LR, weight_decay=0.05)),
        lambda: _excluding(FusedAdam(LR, weight_decay=0.05)), {}),
    "adamw, cosine schedule": (
        lambda: keras.optimizers.AdamW(BudgetedCosine(LR, 4, 20), weight_decay=0.05),
        lambda: FusedAdam(BudgetedCosine(LR, 4, 20), weight_decay=0.05), {}),
    "adamw, betas and epsilon": (
        lambda: keras.optimizers.AdamW(LR, beta_1=0.8, beta_2=0.99, epsilon=1e-4, weight_decay=0.05),
        lambda: FusedAdam(LR, beta_1=0.8, beta_2=0.99, epsilon=1e-4, weight_decay=0.05), {}),
    "adamw with ema": (
        lambda: keras.optimizers.AdamW(LR, weight_decay=0.05, use_ema=True, ema_momentum=0.9),
        lambda: FusedAdam(LR, weight_decay=0.05, use_ema=True, ema_momentum=0.9), {}),
    "adamw under loss scaling": (
        lambda: keras.optimizers.AdamW(LR, weight_decay=0.05), lambda: FusedAdam(LR, weight_decay=0.05),
        {"loss_scale": True}),
    "amsgrad (Keras's own path)": (
        lambda: keras.optimizers.AdamW(LR, weight_decay=0.05, amsgrad=True),
        lambda: FusedAdam(LR, weight_decay=0.05, amsgrad=True), {}),
}


def _excluding(optimizer):
    optimizer.exclude_from_weight_decay(var_names=["bias", "beta", "gamma"])
    return optimizer


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_trains_what_keras_trains(case):
    make_keras, make_fused, kwargs = CASES[case]
    reference, fused = _train(make_keras(), **kwargs), _train(make_fused(), **kwargs)
    for a, b, v in zip(reference.get_weights(), fused.get_weights(), reference.weights):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-6, err_msg=v.path)
    start = _model().get_weights()
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(start, fused.get_weights())) > 0.05  # it trained
    ref_slots = {v.path: v.numpy() for v in reference.optimizer.variables}
    fused_slots = {v.path.replace("fused_adam", "adamw" if "adamw" in v.path else "adam"): v.numpy()
                   for v in fused.optimizer.variables}
    assert len(ref_slots) == len(fused_slots)
    for (pa, a), b in zip(ref_slots.items(), fused_slots.values()):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-6, err_msg=pa)


def _traced_op_types(optimizer) -> dict[str, int]:
    """Op types of the traced training step of ``_model`` under ``optimizer``."""
    model = _model()
    model.compile(optimizer=optimizer, loss="mse")
    x, y = _data()
    step = tf.function(lambda a, b: model.optimizer.apply_gradients(zip(
        _grads(model, a, b), model.trainable_variables)))
    graph = step.get_concrete_function(tf.constant(x[:8]), tf.constant(y[:8])).graph
    counts: dict[str, int] = {}
    for op in graph.get_operations():
        counts[op.type] = counts.get(op.type, 0) + 1
    return counts


def _grads(model, x, y):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
    return tape.gradient(loss, model.trainable_variables)


def test_each_variable_is_one_fused_kernel_and_the_step_is_smaller():
    keras_ops, fused_ops = _traced_op_types(keras.optimizers.AdamW(LR, weight_decay=0.05)), \
        _traced_op_types(FusedAdam(LR, weight_decay=0.05))
    n_vars = len(_model().trainable_variables)  # conv kernel, bn gamma and beta, dense kernel and bias
    assert n_vars == 5
    assert fused_ops.get("ResourceApplyAdam") == n_vars and "ResourceApplyAdam" not in keras_ops
    assert sum(fused_ops.values()) < 0.6 * sum(keras_ops.values()), (sum(fused_ops.values()), sum(keras_ops.values()))
    # The bias-correction powers are built once per step, not once per variable.
    assert fused_ops.get("Pow") == 2 and keras_ops.get("Pow") == 2 * n_vars
    amsgrad = _traced_op_types(FusedAdam(LR, weight_decay=0.05, amsgrad=True))
    assert "ResourceApplyAdam" not in amsgrad  # Keras's own path


def test_config_round_trip_and_a_saved_model_resumes(tmp_path):
    optimizer = FusedAdam(BudgetedCosine(LR, 2, 10), weight_decay=0.05, beta_1=0.8, use_ema=True, ema_momentum=0.9)
    config = keras.optimizers.serialize(optimizer)
    assert config["registered_name"] == "tf_bus>FusedAdam"
    again = keras.optimizers.deserialize(json.loads(json.dumps(config)))
    assert type(again) is FusedAdam and again.get_config() == optimizer.get_config()

    model = _train(FusedAdam(LR, weight_decay=0.05), steps=8)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded.optimizer) is FusedAdam and int(loaded.optimizer.iterations) == 8
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_keras_adamw_checkpoint_restores_into_fused_adam(tmp_path):
    """Runs backed up before FusedAdam (Keras's AdamW) resume with it: the same slots."""
    reference = _train(keras.optimizers.AdamW(LR, weight_decay=0.05), steps=8)
    tf.train.Checkpoint(model=reference, optimizer=reference.optimizer).write(str(tmp_path / "ckpt"))
    model = _model()
    model.compile(optimizer=FusedAdam(LR, weight_decay=0.05), loss="mse")
    model.optimizer.build(model.trainable_variables)
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).read(str(tmp_path / "ckpt")).assert_consumed()
    assert int(model.optimizer.iterations) == 8
    x, y = _data()
    reference.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(reference.get_weights(), model.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("weight_decay, decays", [(0.0, False), (1e-4, True)])
def test_make_optimizer_gives_fused_adam(weight_decay, decays):
    optimizer = make_optimizer(1e-3, "cosine", 1, 10, 5, weight_decay)
    assert type(optimizer) is FusedAdam
    assert (optimizer.weight_decay is not None) is decays
    assert isinstance(optimizer._learning_rate, BudgetedCosine)


MIRRORED = textwrap.dedent("""
    import json
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    from tf_bus.models.optimizers import FusedAdam
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 5)).astype("float32"), rng.normal(size=(32, 2)).astype("float32")
    weights = {}
    for name, make in (("keras", lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.05)),
                       ("fused", lambda: FusedAdam(1e-2, weight_decay=0.05))):
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)])
            model.compile(optimizer=make(), loss="mse")
        weights["init"] = [w.tolist() for w in model.get_weights()]
        model.fit(x, y, batch_size=8, epochs=5, shuffle=False, verbose=0)
        weights[name] = [w.tolist() for w in model.get_weights()]
        replicas = strategy.num_replicas_in_sync
    print(json.dumps({"replicas": replicas, **weights}))
""")


def test_under_mirrored_strategy_it_trains_what_keras_trains():
    r = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    for a, b in zip(out["keras"], out["fused"]):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=2e-6)
    assert max(float(np.max(np.abs(np.array(a) - np.array(b)))) for a, b in zip(out["init"], out["fused"])) > 0.05
