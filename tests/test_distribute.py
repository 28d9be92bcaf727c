"""--strategy: MirroredStrategy over 2 logical CPU devices trains the U-Net and the classifier
(in a fresh process, since logical devices must be set before TensorFlow starts). The
classifier's fine-tuning phase and KerasTuner trials under a strategy are tested with
two worker processes in test_multiworker.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tensorboard_events import read_overlays

from tf_bus.config import ConfigError, SegmenterConfig
from tf_bus.training.segmentation import load_best_model

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tf_bus.config import ClassifierConfig, SegmenterConfig
    from tf_bus.training.segmentation import train_segmenter
    from tf_bus.training.classification import train_classifier
    from tf_bus.models.classifier import bottleneck_resnet
    data, out = sys.argv[1], sys.argv[2]
    seg = train_segmenter(data, out + "/seg", SegmenterConfig(image_size=(32, 32), depth=2, base_filters=4, epochs=1,
                          batch_size=8, warmup_epochs=0, time_budget_minutes=0, strategy="mirrored"), verbose=0)
    # Deep supervision: the wrapper's own train_step, run by each replica.
    ds = train_segmenter(data, out + "/seg_ds", SegmenterConfig(image_size=(32, 32), depth=2, base_filters=4, epochs=2,
                         batch_size=8, warmup_epochs=0, time_budget_minutes=0, strategy="mirrored",
                         deep_supervision=1, diagnostics=False), verbose=0)
    w = out + "/w.weights.h5"
    bottleneck_resnet((1, 1, 1, 1), (32, 32, 3)).save_weights(w)  # resnet14 (conftest.TEST_BACKBONE)
    cls = train_classifier(data, out + "/cls", ClassifierConfig(backbone="resnet14", image_size=(32, 32), weights=w,
                           head_epochs=1, epochs=1, batch_size=8, warmup_epochs=0, time_budget_minutes=0,
                           strategy="mirrored"), verbose=0)
    print(json.dumps({"seg": seg, "cls": cls, "seg_ds": ds}))
""")


def test_mirrored_over_two_logical_cpus(prepared, tmp_path):
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(prepared), str(tmp_path)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0 <= out["seg"]["best_val_dice"] <= 1 and 0 <= out["cls"]["best_val_f1"] <= 1
    assert out["cls"]["epochs_run_in_this_fit"] == 1
    # The classifier's second phase and the tuner's trials under a strategy: test_multiworker.py.
    assert out["seg_ds"]["epochs_run_in_this_fit"] == 2 and 0 <= out["seg_ds"]["best_val_dice"] <= 1
    ds_rows = json.loads((tmp_path / "seg_ds" / "history.json").read_text())["history"]
    assert all(np.isfinite(ds_rows["loss"])) and ds_rows["loss"][1] != ds_rows["loss"][0]
    assert type(load_best_model(tmp_path / "seg_ds")).__name__ == "UNet"
    for run, strategy, replicas in (("seg", "mirrored", 2), ("cls", "mirrored", 2), ("seg_ds", "mirrored", 2)):
        record = json.loads((tmp_path / run / "config.json").read_text())
        assert record["replicas"] == replicas and record["config"]["strategy"] == strategy
        assert (tmp_path / run / "best.keras").is_file()
    # The U-Net's TensorBoard overlays, drawn by a plain call of the mirrored model: one
    # prediction per image, the trained model's (one epoch, so best.keras is that model).
    strips = read_overlays(tmp_path / "seg" / "logs")
    assert sorted(strips) == [0] and strips[0].shape[1:] == (32, 96, 1) and 1 <= len(strips[0]) <= 4
    model = load_best_model(tmp_path / "seg")
    expected = np.asarray(model(strips[0][:, :, :32].astype("float32"), training=False), np.float32)
    np.testing.assert_allclose(strips[0][:, :, 64:], expected, atol=0.03)  # inputs went through 8-bit PNG


def test_bad_strategy_and_uneven_global_batch():
    from tf_bus.config import ClassifierConfig

    with pytest.raises(ConfigError, match="strategy"):
        SegmenterConfig(strategy="tpu")
    assert ClassifierConfig(strategy="multiworker").strategy == "multiworker"
    from tf_bus.training.distribute import check_global_batch

    with pytest.raises(ConfigError, match="multiple of 2"):
        check_global_batch(7, 2)


def test_multiworker_tuning_refuses_kerastuner_distributed_tuning(monkeypatch, prepared, tmp_path):
    from tf_bus.config import ClassifierConfig, TuneConfig
    from tf_bus.data.busi import TfBusError
    from tf_bus.training.tuning import tune_classifier

    for name, value in (("KERASTUNER_ORACLE_IP", "127.0.0.1"), ("KERASTUNER_ORACLE_PORT", "8000"),
                        ("KERASTUNER_TUNER_ID", "chief")):
        monkeypatch.setenv(name, value)
    with pytest.raises(TfBusError, match="cannot be combined with KerasTuner's distributed tuning"):
        tune_classifier(prepared, tmp_path / "tune", TuneConfig(base=ClassifierConfig(strategy="multiworker")))
    assert not (tmp_path / "tune").exists()


@pytest.mark.parametrize("batch,examples,replicas,expected", [
    (8, 88, 1, (8, False)),   # one device: as given
    (8, 5, 1, (8, False)),
    (8, 88, 2, (8, False)),   # 11 full batches
    (8, 6, 2, (6, False)),    # one batch of 6: 3 + 3
    (8, 11, 2, (8, False)),   # 8 + 3: the last batch still gives each replica an image
    (8, 73, 2, (8, True)),    # every even batch size leaves 1 image over: it is left out
    (8, 5, 2, (4, True)),
    (16, 88, 4, (16, False)),  # 5 x 16 + 8
])
def test_validation_batches_split_over_the_replicas(batch, examples, replicas, expected, capsys):
    from tf_bus.training.distribute import validation_batching

    size, drop = validation_batching(batch, examples, replicas)
    assert (size, drop) == expected
    said = capsys.readouterr().out
    assert (f"{examples % size} validation image(s) left out" in said) == drop, said  # both trainers say so
    if replicas > 1:
        batches = [size] * (examples // size) + ([] if drop or examples % size == 0 else [examples % size])
        assert batches[0] % replicas == 0 and all(b >= replicas for b in batches)
        assert examples - sum(batches) < replicas


def test_a_validation_split_smaller_than_the_replicas_is_refused():
    from tf_bus.training.distribute import validation_batching

    with pytest.raises(ConfigError, match="fewer than the 4 replicas"):
        validation_batching(8, 3, 4)
