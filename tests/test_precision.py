"""What ``--precision auto`` picks on each kind of hardware, and the names it accepts."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from conftest import TEST_BACKBONE, backbone_weights
from tf_bus.config import PRECISIONS, ConfigError, SegmenterConfig
from tf_bus.training.precision import (POLICIES, auto_precision, cpu_has_native_bf16, emulated_precision_warning,
                                       gpu_compute_capabilities, precision_policy, resolve_precision)

AUTO = [
    # (GPU compute capabilities, CPU has native bf16, expected)
    ([], False, "float32"),
    ([], True, "mixed_bfloat16"),
    ([(8, 0)], False, "mixed_bfloat16"),          # A100
    ([(9, 0), (8, 6)], False, "mixed_bfloat16"),  # H100 beside an RTX 30xx
    ([(7, 5)], True, "mixed_float16"),            # T4: the GPU decides, not the CPU
    ([(7, 0)], False, "mixed_float16"),           # V100
    ([(8, 0), (7, 0)], False, "mixed_float16"),   # the oldest GPU decides
    ([(6, 1)], True, "float32"),                  # no tensor cores
    ([None], True, "float32"),                    # a GPU that reports no capability
    ([(8, 0), None], False, "float32"),
]


@pytest.mark.parametrize("gpus, cpu_bf16, expected", AUTO)
def test_auto_picks_the_precision_of_the_hardware(gpus, cpu_bf16, expected):
    assert auto_precision(gpus, cpu_bf16) == expected


@pytest.mark.parametrize("name, gpus, cpu_bf16, warned", [
    ("mixed_bfloat16", [], False, True),         # emulated: the CPU has no bf16 arithmetic
    ("mixed_bfloat16", [], True, False),
    ("mixed_bfloat16", [(8, 0)], False, False),  # the GPU computes it
    ("float32", [], False, False),
    ("mixed_float16", [(7, 0)], False, False),
])
def test_a_named_precision_this_machine_would_emulate_is_warned_about(name, gpus, cpu_bf16, warned):
    message = emulated_precision_warning(name, gpus, cpu_bf16)
    assert (message is not None) == warned
    if warned:
        assert "13.8x slower" in message and "--precision auto" in message


def test_resolving_mixed_bfloat16_warns_exactly_where_this_cpu_lacks_bf16():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_precision("mixed_bfloat16") == "mixed_bfloat16"
    emulated = [w for w in caught if "emulates it" in str(w.message)]
    assert len(emulated) == (0 if gpu_compute_capabilities() or cpu_has_native_bf16() else 1)


def test_every_named_precision_is_a_keras_policy_and_resolves_to_itself():
    assert set(POLICIES) == set(PRECISIONS) - {"auto"}
    for name in POLICIES:
        assert resolve_precision(name) == name
        assert keras.DTypePolicy(name).name == name
        assert SegmenterConfig(precision=name).precision == name
    assert resolve_precision("auto") in POLICIES
    with pytest.raises(ConfigError, match="Received: precision='fp16'"):
        resolve_precision("fp16")
    with pytest.raises(ConfigError, match="Received: precision='fp16'"):
        SegmenterConfig(precision="fp16")


def test_a_unet_trains_under_mixed_float16_with_loss_scaling():
    from tf_bus.models.losses import get_loss
    from tf_bus.models.unet import UNet

    rng = np.random.default_rng(0)
    x = rng.random((8, 32, 32, 1)).astype("float32")
    y = (x > 0.5).astype("float32")
    with precision_policy("mixed_float16"):
        keras.utils.set_random_seed(0)
        model = UNet(image_size=(32, 32), channels=1, depth=2, base_filters=4)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=get_loss("bce_dice"))
        history = model.fit(x, y, batch_size=4, epochs=4, verbose=0).history["loss"]
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.get_layer("mask").compute_dtype == "float32" and model(x[:1]).dtype == "float32"
    assert all(np.isfinite(history)) and history[-1] < history[0]


@pytest.mark.slow
def test_train_segmenter_runs_in_mixed_float16_with_deep_supervision(prepared, tmp_path):
    """The trainer's own path: the policy recorded, DeepSupervision's custom train step scaling
    its loss through the LossScaleOptimizer, a float32 mask from the saved model, and no
    gradient rule fired by float16 underflow."""
    import json

    from tf_bus.training.segmentation import load_run_config, train_segmenter

    config = SegmenterConfig(image_size=(32, 32), depth=2, base_filters=4, batch_size=8, epochs=2, warmup_epochs=0,
                             precision="mixed_float16", deep_supervision=1)
    summary = train_segmenter(prepared, tmp_path / "run", config, verbose=0)
    _, record = load_run_config(tmp_path / "run")
    assert record["precision"] == "mixed_float16" and keras.mixed_precision.global_policy().name == "float32"
    assert 0 <= summary["best_val_dice"] <= 1
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert all(np.isfinite(history["history"]["loss"]))
    model = keras.saving.load_model(tmp_path / "run" / "best.keras")
    assert model(np.zeros((1, 32, 32, 1), "float32")).dtype == "float32"
    rules = json.loads((tmp_path / "run" / "diagnostics.json").read_text())["rules"]
    assert not rules["vanishing_gradient"]["triggered"] and not rules["exploding_gradient"]["triggered"]


@pytest.mark.slow
def test_train_classifier_runs_in_mixed_float16(prepared, tmp_path):
    """Both phases of fine-tuning (head, then the unfrozen stages) compile under the float16
    policy, so each gets its LossScaleOptimizer; the run trains to finite losses."""
    import json

    from tf_bus.config import ClassifierConfig
    from tf_bus.training.classification import train_classifier

    weights = backbone_weights(tmp_path / "backbone.weights.h5")
    config = ClassifierConfig(backbone=TEST_BACKBONE, image_size=(32, 32), batch_size=8, epochs=1, warmup_epochs=0,
                              time_budget_minutes=0, weights=str(weights), head_epochs=1, precision="mixed_float16")
    summary = train_classifier(prepared, tmp_path / "run", config, verbose=0)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["precision"] == "mixed_float16" and keras.mixed_precision.global_policy().name == "float32"
    assert summary["head_epochs"] == 1 and 0.0 <= summary["best_val_f1"] <= 1.0
    history = json.loads((tmp_path / "run" / "history.json").read_text())["history"]
    assert history["loss"] and all(np.isfinite(history["loss"]))
    model = keras.saving.load_model(tmp_path / "run" / "best.keras")
    assert model(np.zeros((1, *model.input_shape[1:]), "float32")).dtype == "float32"
