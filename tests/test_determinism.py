"""--deterministic: one seed, one model, for both trainers; the process is left as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tensorflow.python.framework import config as tf_config

from conftest import TEST_BACKBONE, backbone_weights, cli
from tf_bus.config import ClassifierConfig, SegmenterConfig
from tf_bus.training.callbacks import TimeBudget
from tf_bus.training.classification import train_classifier
from tf_bus.training.common import op_determinism
from tf_bus.training.segmentation import train_segmenter

pytestmark = pytest.mark.slow


def _segmenter(data, run, weights_file):
    config = SegmenterConfig(image_size=(32, 32), depth=2, base_filters=4, epochs=2, batch_size=8, warmup_epochs=0,
                             time_budget_minutes=0, deterministic=True)
    return train_segmenter(data, run, config, verbose=0)


def _classifier(data, run, weights_file):
    # Head-only over a local weights file (quick to trace), with mixup and the lesion head's masks.
    config = ClassifierConfig(backbone=TEST_BACKBONE, image_size=(32, 32), batch_size=8, epochs=1, head_epochs=1,
                              warmup_epochs=0, time_budget_minutes=0, weights=str(weights_file), mixup=0.2,
                              deterministic=True)
    return train_classifier(data, run, config, verbose=0)


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    return backbone_weights(tmp_path_factory.mktemp("weights") / "backbone.weights.h5")


@pytest.mark.parametrize("train", [_segmenter, _classifier], ids=["segmenter", "classifier"])
def test_two_deterministic_runs_train_identical_weights(train, prepared, resnet_weights, tmp_path):
    import keras

    weights, histories = [], []
    for k in range(2):
        run = tmp_path / f"run{k}"
        train(prepared, run, resnet_weights)
        model = keras.saving.load_model(run / "last.keras")
        weights.append(model.get_weights())
        histories.append((run / "history.csv").read_text())
        assert not tf_config.is_op_determinism_enabled()  # switched on for the run only
    assert histories[0] == histories[1]  # every loss and metric of every epoch
    assert len(weights[0]) == len(weights[1])
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


def test_op_determinism_is_scoped_and_keeps_a_setting_made_before():
    assert not tf_config.is_op_determinism_enabled()
    with op_determinism(False):
        assert not tf_config.is_op_determinism_enabled()
    with op_determinism(True):
        assert tf_config.is_op_determinism_enabled()
    assert not tf_config.is_op_determinism_enabled()
    with pytest.raises(RuntimeError), op_determinism(True):  # restored on errors too
        raise RuntimeError
    assert not tf_config.is_op_determinism_enabled()


@pytest.mark.parametrize("strategy, deterministic, feeds_schedule", [
    ("default", False, True),
    ("default", True, False),   # the learning rate must not depend on the clock
    ("multiworker", False, False),
    ("mirrored", True, False),
])
def test_the_time_budget_feeds_the_schedule_only_where_it_may(strategy, deterministic, feeds_schedule):
    for config in (SegmenterConfig(strategy=strategy, deterministic=deterministic),
                   ClassifierConfig(strategy=strategy, deterministic=deterministic)):
        assert TimeBudget.for_config(config).feed_schedule is feeds_schedule


COMMANDS = {  # each command's smallest real run, and the file that records the config it trained with
    "train-segmenter": (["--image-size", "32", "--depth", "2", "--base-filters", "4", "--batch-size", "8",
                         "--epochs", "1", "--warmup-epochs", "0"], "config.json", lambda d: d["config"]),
    "train-classifier": (["--backbone", TEST_BACKBONE, "--image-size", "32", "--batch-size", "8", "--epochs", "1",
                          "--head-epochs", "1", "--warmup-epochs", "0", "--weights", "{weights}"],
                         "config.json", lambda d: d["config"]),
    "tune": (["--image-size", "32", "--max-trials", "1", "--backbones", TEST_BACKBONE, "--batch-sizes", "8",
              "--epochs-range", "1,1", "--fine-tune-stages-range", "1,1", "--weights", "{weights}"],
             "best_hyperparameters.json", lambda d: d["config"]),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_flag_reaches_the_config_each_command_trains_with(command, prepared, resnet_weights, tmp_path):
    flags, record, config_of = COMMANDS[command]
    flags = [f.format(weights=resnet_weights) for f in flags]
    out = tmp_path / "out"
    r = cli(command, "--data", prepared, "--out", out, "--deterministic", "--quiet", *flags)  # in process
    assert r.returncode == 0, r.stderr[-3000:]
    assert config_of(json.loads((out / record).read_text()))["deterministic"] is True


@pytest.mark.parametrize("strategy, deterministic, expected", [
    ("default", False, False),   # tf.data may hand on elements as they finish
    ("default", True, True),
    ("mirrored", False, False),
    ("multiworker", False, True),  # each worker keeps its rows of every global batch
])
def test_each_trainers_loaders_keep_their_order_where_they_must(strategy, deterministic, expected):
    import tf_bus.training.classification as classification
    import tf_bus.training.segmentation as segmentation

    for module, cls in ((segmentation, SegmenterConfig), (classification, ClassifierConfig)):
        config = cls(strategy=strategy, deterministic=deterministic)
        assert module.loader_config(config).deterministic is expected
        assert module.loader_config(config, batch_size=4, augment=False).deterministic is expected
