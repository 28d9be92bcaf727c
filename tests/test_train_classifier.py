"""`train-classifier` with tiny inputs: from scratch and two-phase fine-tuning from a local file."""

from __future__ import annotations

import csv
import json

import keras
import numpy as np
import pytest

from conftest import TEST_BACKBONE, backbone_weights, cli
from tf_bus.config import ClassifierConfig, ConfigError
from tf_bus.data.busi import TfBusError
from tf_bus.training.classification import train_classifier

pytestmark = pytest.mark.slow


def tiny(**kw) -> ClassifierConfig:
    base = dict(image_size=(32, 32), batch_size=8, epochs=1, warmup_epochs=0, time_budget_minutes=0)
    return ClassifierConfig(**{**base, **kw})


def test_class_weights_then_evaluate(prepared, tmp_path):
    # Head-only over a local weights file of a resnet14: quick to trace (ResNet50 fine-tunes in
    # two phases below). From-scratch training (every layer, BatchNorm included) runs in the
    # demo test and test_classifier_model.py.
    weights = backbone_weights(tmp_path / "backbone.weights.h5")
    run = tmp_path / "run"
    summary = train_classifier(prepared, run, tiny(backbone=TEST_BACKBONE, balance="class_weights", weights=str(weights),
                                                   head_epochs=1), verbose=0)
    assert summary["epochs_run_in_this_fit"] == 1 and summary["head_epochs"] == 1
    assert 0.0 <= summary["best_val_f1"] <= 1.0
    for name in ("config.json", "best.keras", "last.keras", "history.csv", "history.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "config.json").read_text())["balance_used"] == "class_weights"
    model = keras.saving.load_model(run / "best.keras")
    assert model.output_shape == (None, 3)
    r = cli("evaluate-classifier", run, "--data", prepared)  # in process
    assert r.returncode == 0, r.stderr
    result = json.loads((run / "eval_test" / "metrics.json").read_text())
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert result["n"] == sum(manifest["counts_before_balancing"]["test"].values()) == len(result["per_image"])
    assert {"accuracy", "macro_f1", "per_class", "confusion_matrix", "macro_roc_auc_ovr"} <= set(result)
    assert sum(map(sum, result["confusion_matrix"])) == result["n"]
    for png in ("confusion_matrix.png", "roc.png", "calibration.png"):
        assert (run / "eval_test" / png).read_bytes()[:4] == b"\x89PNG"
    # --tta --checkpoint last: the mean of each image's and its mirror's probabilities, from last.keras.
    from tf_bus.data.pipeline import classification_dataset
    from tf_bus.evaluation import evaluate_classifier
    from tf_bus.training.classification import loader_config

    (tmp_path / "best_eval.json").write_text((run / "eval_test" / "metrics.json").read_text())
    tta = evaluate_classifier(run, prepared, "test", tta=True, checkpoint="last")
    # tf-bus compare pairs the two real evaluations case by case.
    from tf_bus.comparison import compare

    paired = compare(tmp_path / "best_eval.json", run, resamples=200)
    assert paired["kind"] == "classifier" and paired["n"] == result["n"] and paired["only_in_a"] == 0
    assert paired["accuracy"]["a"] == pytest.approx(result["accuracy"])
    assert paired["accuracy"]["b"] == pytest.approx(tta["accuracy"])
    assert paired["macro_f1"]["b"] == pytest.approx(tta["macro_f1"])
    assert tta["settings"]["tta"] and tta["settings"]["model"].endswith("last.keras")
    last = keras.saving.load_model(run / "last.keras")
    cfg = ClassifierConfig.from_dict(json.loads((run / "config.json").read_text())["config"])
    ds = classification_dataset(prepared, "test", loader_config(cfg, shuffle=False, augment=False, cache=False),
                                training=False, include_augmented=False, include_names=True)
    batches = list(ds)
    x = np.concatenate([b[0].numpy() for b in batches])
    names = [n.decode() for b in batches for n in b[2].numpy()]
    expected = dict(zip(names, (last.predict(x, verbose=0) + last.predict(x[:, :, ::-1], verbose=0)) / 2))
    assert sorted(expected) == sorted(r["name"] for r in tta["per_image"])
    for r in tta["per_image"]:
        np.testing.assert_allclose(r["probabilities"], expected[r["name"]], atol=1e-5, err_msg=r["name"])
    with pytest.raises(TfBusError, match="checkpoint"):
        evaluate_classifier(run, prepared, "test", checkpoint="first")


def test_two_phase_fine_tuning_with_the_lesion_head(prepared, tmp_path):
    # Two phases over a local ResNet50 weights file (the path of users with ImageNet weights),
    # with the multi-task lesion head and balanced sampling.
    source = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    weights = tmp_path / "resnet50_notop.weights.h5"
    source.save_weights(weights)
    run = tmp_path / "run"
    cfg = tiny(weights=str(weights), head_epochs=1, epochs=2, balance="sampling", mask_loss_weight=1.0, mixup=0.4)
    summary = train_classifier(prepared, run, cfg, verbose=0)
    assert summary["head_epochs"] == 1 and summary["epochs_run_in_this_fit"] == 2
    assert (run / "head.weights.h5").is_file()
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1], "the fine-tuning phase continues the epoch count"
    # best.keras follows the validation cross-entropy (the default --monitor), logged as val_ce.
    assert summary["monitor"] == "val_ce" and summary["best_val_ce"] == pytest.approx(min(float(r["val_ce"]) for r in rows))
    # The lesion head's BCE + Dice is in the loss: well above the label-smoothed cross-entropy alone.
    assert all(float(r["loss"]) > 1.5 for r in rows), rows
    for name in ("best.keras", "last.keras"):  # only the image -> probabilities classifier is saved
        model = keras.saving.load_model(run / name)
        assert model.input_shape == (None, 32, 32, 1) and model.output_shape == (None, 3), name
        assert not any(l.name.startswith("lesion") for l in model.layers), name
    with pytest.raises(TfBusError, match="--overwrite"):
        train_classifier(prepared, run, cfg, verbose=0)


@pytest.mark.parametrize("with_masks", [False, True])
def test_mixup_blends_each_row_with_one_partner(with_masks):
    import tensorflow as tf

    from tf_bus.training.classification import mixup

    # Row i's image is the one-hot of i, so a mixed image shows its weight and its partner.
    n, batches = 6, 40
    eye = np.eye(n, dtype=np.float32)
    images = eye.reshape(n, 1, 1, n)
    labels = np.eye(3, dtype=np.float32)[np.arange(n) % 3]
    masks = np.stack([np.full((2, 2, 1), i % 2, np.float32) for i in range(n)])
    known = np.array([1, 1, 0, 1, 1, 1], np.float32)
    x = {"image": images, "lesion_mask": masks, "mask_known": known} if with_masks else images
    ds = tf.data.Dataset.from_tensors((x, labels)).repeat(batches)
    lams = []
    out = list(mixup(ds, 0.4, seed=3).as_numpy_iterator())
    assert len(out) == batches
    for mx, my in out:
        img = (mx["image"] if with_masks else mx).reshape(n, n)
        for i in range(n):
            partners = [j for j in range(n) if j != i and img[i, j] > 1e-6]
            assert len(partners) <= 1, img[i]
            np.testing.assert_allclose(img[i].sum(), 1.0, atol=1e-5)
            j = partners[0] if partners else i  # paired with itself: the row is unchanged
            w = img[i, j] if j != i else 0.0  # the partner's weight, 1 - lam
            np.testing.assert_allclose(my[i], (1 - w) * labels[i] + w * labels[j], atol=1e-5)
            if with_masks:
                np.testing.assert_allclose(mx["lesion_mask"][i], (1 - w) * masks[i] + w * masks[j], atol=1e-5)
                assert mx["mask_known"][i] == known[i] * known[j]
            if j != i:
                lams.append(1 - w)
    lams = np.array(lams)
    # Beta(0.4, 0.4) is symmetric and U-shaped: mean near 0.5, most weights near 0 or 1.
    assert 0.35 < lams.mean() < 0.65 and np.mean((lams < 0.2) | (lams > 0.8)) > 0.4
    # Seeded: a new pipeline with the same seed mixes the same way; another seed does not.
    again = list(mixup(ds, 0.4, seed=3).as_numpy_iterator())
    other = list(mixup(ds, 0.4, seed=4).as_numpy_iterator())
    np.testing.assert_array_equal(out[0][1], again[0][1])
    assert not np.array_equal(out[0][1], other[0][1])


def test_bad_weights_fail_before_any_training(prepared, tmp_path):
    with pytest.raises(TfBusError, match="no such weights file"):
        train_classifier(prepared, tmp_path / "run", tiny(weights=str(tmp_path / "missing.h5")), verbose=0)
    assert not (tmp_path / "run" / "history.csv").exists()


@pytest.mark.parametrize("kwargs,field", [(dict(backbone="vgg16"), "backbone"), (dict(image_size=(16, 16)), "image_size"),
                                          (dict(fine_tune_stages=7), "fine_tune_stages"), (dict(balance="x"), "balance"),
                                          (dict(monitor="val_accuracy"), "monitor"), (dict(mixup=-0.2), "mixup"),
                                          (dict(mask_loss_weight=0.0, lesion_pooling=True), "lesion_pooling"),
                                          (dict(backbone="resnet14", weights="imagenet"), "resnet50 and resnet101 only")])
def test_bad_classifier_config(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ClassifierConfig(**kwargs)
