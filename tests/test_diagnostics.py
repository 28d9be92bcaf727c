"""Each Debugger rule fires on a model built to trigger it, and stays quiet on a healthy one."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from tf_bus.training.diagnostics import RULES, TrainingDiagnostics


def data(n=64, d=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = (x[:, :1] * 0.7 - x[:, 1:2] * 0.3).astype("float32")
    return x, y


def mlp(depth=3, width=16, activation="relu", init="he_normal", bias=0.0, lr=1e-2, optimizer="adam", loss="mse"):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,))] + [
        keras.layers.Dense(width, activation=activation, kernel_initializer=init,
                           bias_initializer=keras.initializers.Constant(bias)) for _ in range(depth)
    ] + [keras.layers.Dense(1)])
    opt = keras.optimizers.Adam(lr) if optimizer == "adam" else keras.optimizers.SGD(lr)
    model.compile(optimizer=opt, loss=loss)
    return model


def run(model, tmp_path, epochs=8, val=None, **kw):
    x, y = data()
    diag = TrainingDiagnostics(tmp_path, (x[:16], y[:16]), every_n_steps=2, **kw)
    model.fit(x, y, batch_size=16, epochs=epochs, validation_data=val, callbacks=[diag], verbose=0)
    return diag


HEALTHY = dict()
CASES = {
    "vanishing_gradient": (lambda: mlp(depth=12, activation="sigmoid", init=keras.initializers.RandomNormal(stddev=1e-3)),
                           dict(vanishing_threshold=1e-6)),
    "exploding_gradient": (lambda: mlp(lr=1e12, optimizer="sgd"), dict()),
    "poor_weight_initialization": (lambda: mlp(bias=-10.0), dict()),
    "loss_not_decreasing": (lambda: mlp(lr=0.0, optimizer="sgd"), dict(stall_epochs=3)),
}


@pytest.mark.parametrize("rule", sorted(CASES))
def test_rule_fires_on_a_model_built_to_trigger_it(rule, tmp_path):
    build, kw = CASES[rule]
    diag = run(build(), tmp_path, **kw)
    assert diag.rules[rule]["triggered"], diag.rules
    saved = json.loads((tmp_path / "diagnostics.json").read_text())
    assert saved["rules"][rule]["triggered"]
    assert "**yes**" in (tmp_path / "diagnostics.md").read_text()


def test_exploding_loss_stops_training_with_a_message(tmp_path):
    diag = run(mlp(lr=1e12, optimizer="sgd"), tmp_path, epochs=50)
    assert diag.stop_message and "Lower the learning rate" in diag.stop_message
    assert len(diag._epoch_logs) < 50


def test_overfit_fires_when_validation_loss_rises_while_training_loss_falls(tmp_path):
    x, y = data()
    xv, yv = data(seed=1)
    yv = -yv  # a validation target the training data teaches the opposite of
    diag = run(mlp(depth=3, width=64, lr=1e-2), tmp_path, epochs=12, val=(xv, yv), overfit_epochs=3)
    assert diag.rules["overfit"]["triggered"], diag._epoch_logs


def test_a_healthy_run_fires_nothing(tmp_path):
    x, y = data()
    diag = run(mlp(), tmp_path, epochs=8, val=(x, y))
    assert not any(r["triggered"] for r in diag.rules.values()), diag.rules
    assert set(diag.rules) == set(RULES)
    assert diag.grad_history and (tmp_path / "gradient_norms.png").read_bytes()[:4] == b"\x89PNG"
    assert diag.rules["poor_weight_initialization"]["measured"]["dead_relu_layers"] == {}


def test_the_gradient_plot_is_redrawn_only_when_a_new_check_arrives(tmp_path):
    """Drawing the PNG costs about 0.14 s, so epochs without a new gradient check skip it."""
    diag = run(mlp(), tmp_path, epochs=2)
    png = tmp_path / "gradient_norms.png"
    checks = len(diag.grad_history)
    assert checks and png.exists()
    png.unlink()
    diag.on_epoch_end(2, {"loss": 1.0})  # no new check: the report is rewritten, the plot is not
    assert not png.exists() and (tmp_path / "diagnostics.json").exists()
    assert "gradient_norms.png" in (tmp_path / "diagnostics.md").read_text()
    diag._check_gradients("step test")  # a new check: the plot follows
    diag.on_epoch_end(3, {"loss": 1.0})
    assert len(diag.grad_history) == checks + 1 and png.read_bytes()[:4] == b"\x89PNG"


def tiny_mse(y, p):
    """An MSE 1e-8 times too small: its gradients underflow in float16 unless the loss is scaled."""
    return 1e-8 * keras.ops.mean(keras.ops.square(keras.ops.cast(y, "float32") - keras.ops.cast(p, "float32")))


def test_gradient_norms_under_mixed_float16_are_taken_with_the_loss_scale(tmp_path):
    x, y = data()
    norms = {}
    for policy in ("float32", "mixed_float16"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            model = mlp(loss=tiny_mse)  # the same seed, so the same float32 weights under both policies
        finally:
            keras.mixed_precision.set_global_policy("float32")
        diag = TrainingDiagnostics(tmp_path / policy, (x[:16], y[:16]))
        diag.set_model(model)
        norms[policy] = diag._gradient_norms()
        if policy == "mixed_float16":
            assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
            unscaled = diag._scaled_gradient_norms(1.0)
    reference = list(norms["float32"].values())  # the same kernels in the same order (their paths differ)
    assert len(norms["mixed_float16"]) == len(reference) == 4 and min(reference) > 0
    assert list(norms["mixed_float16"].values()) == pytest.approx(reference, rel=0.05)
    # Without the scale every float16 gradient underflows: the vanishing-gradient rule would fire falsely.
    assert max(unscaled.values()) < 1e-3 * min(reference)
