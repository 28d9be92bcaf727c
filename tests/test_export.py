"""`tf-bus export`: SavedModels for TF Serving whose signatures match the in-memory Keras model."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import cli
from tf_bus.data.busi import TfBusError
from tf_bus.export import export_run, read_run

pytestmark = pytest.mark.slow


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (40, 56), dtype=np.uint8)
    rgb = rng.integers(0, 255, (50, 30, 3), dtype=np.uint8)
    return {"grey_png": (grey, png(grey)), "rgb_png": (rgb, png(rgb)), "rgb_jpeg": (rgb, jpeg(rgb))}


def keras_input(encoded: bytes, size, channels) -> np.ndarray:
    """What the loaders feed the model: decoded, resized exactly as in training, [0, 255]."""
    from tf_bus.data.pipeline import decode_image, resize_image

    return resize_image(decode_image(tf.constant(encoded), channels), channels, size).numpy().astype("float32")


def stored_values(saved_model: str) -> int:
    """How many numbers the SavedModel's checkpoint holds."""
    reader = tf.train.load_checkpoint(os.path.join(saved_model, "variables", "variables"))
    return sum(int(np.prod(shape)) for name, shape in reader.get_variable_to_shape_map().items()
               if name != "_CHECKPOINTABLE_OBJECT_GRAPH")


def test_classifier_export_matches_the_keras_model(tiny_runs, tmp_path, images):
    info = export_run(tiny_runs["classifier"], tmp_path / "models", "busi_classifier")
    assert info["version"] == 1 and Path(info["path"]) == tmp_path / "models" / "busi_classifier" / "1"
    _, _, model = read_run(tiny_runs["classifier"])
    loaded = tf.saved_model.load(info["path"])
    assert {"serving_default", "predict_tensor"} <= set(loaded.signatures)
    encoded = [images[k][1] for k in ("grey_png", "rgb_png", "rgb_jpeg")]
    out = loaded.signatures["serving_default"](images=tf.constant(encoded))
    x = np.stack([keras_input(e, (32, 32), 1) for e in encoded])
    expected = model(x, training=False).numpy()
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(out["class_ids"].numpy(), expected.argmax(-1))
    assert [n.decode() for n in out["class_names"].numpy()] == [("benign", "malignant", "normal")[i] for i in expected.argmax(-1)]
    t = loaded.signatures["predict_tensor"](images=tf.constant(x))
    np.testing.assert_allclose(t["probabilities"].numpy(), expected, atol=1e-5)
    # Each weight stored once (keras-team/keras#23553 stores them twice after track()).
    assert stored_values(info["path"]) == model.count_params()


def test_export_writes_tf_servings_warmup_request_and_it_replays(tiny_runs, tmp_path):
    from tensorflow_serving.apis import prediction_log_pb2

    from tf_bus.serving import service
    from tf_bus.serving.core import load_servable

    info = export_run(tiny_runs["segmenter"], tmp_path / "models", "busi_segmenter")
    path = Path(info["path"], "assets.extra", "tf_serving_warmup_requests")
    (raw,) = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
    record = prediction_log_pb2.PredictionLog.FromString(raw)
    req = record.predict_log.request
    assert (req.model_spec.name, req.model_spec.signature_name, list(req.inputs)) == (
        "busi_segmenter", "serving_default", ["images"])
    (png,) = tf.make_ndarray(req.inputs["images"])
    assert Image.open(io.BytesIO(png)).size == (560, 480) and path.stat().st_size < 20_000
    assert service.warmup(load_servable("busi_segmenter", 1, info["path"])) == 1


@pytest.mark.parametrize("postprocess", ["none", "largest"])
def test_segmenter_export_returns_masks_at_each_inputs_own_size(tiny_runs, tmp_path, images, postprocess):
    from tf_bus.evaluation import postprocess_mask

    _, _, model = read_run(tiny_runs["segmenter"])
    encoded = [images["grey_png"][1], images["rgb_png"][1]]
    x = np.stack([keras_input(e, (32, 32), 1) for e in encoded])
    small = model(x / 255.0, training=False).numpy()
    # The median probability as threshold: a ragged mask, several components and holes.
    threshold = float(np.median(small))
    info = export_run(tiny_runs["segmenter"], tmp_path / "models", "busi_segmenter", threshold=threshold,
                      postprocess=postprocess)
    assert info["postprocess"] == postprocess and info["threshold"] == threshold
    loaded = tf.saved_model.load(info["path"])
    out = loaded.signatures["serving_default"](images=tf.constant(encoded))
    sizes = out["image_size"].numpy()
    np.testing.assert_array_equal(sizes, [[40, 56], [50, 30]])
    probs = out["mask_probabilities"].numpy()
    assert probs.shape == (2, 50, 56)  # padded to the largest height and width
    for i, (h, w) in enumerate(sizes):
        own = tf.image.resize(small[i], (h, w), method="bilinear").numpy()[..., 0]
        np.testing.assert_allclose(probs[i, :h, :w], own, atol=1e-5)
        assert not probs[i, h:, :].any() and not probs[i, :, w:].any()
        mask = np.asarray(Image.open(io.BytesIO(out["mask_png_bytes"].numpy()[i])))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        expected = postprocess_mask(own >= threshold, postprocess)
        if postprocess == "largest":
            assert not np.array_equal(expected, own >= threshold), "post-processing must change this case"
        np.testing.assert_array_equal(mask == 255, expected)
        assert out["lesion_area_fraction"].numpy()[i] == pytest.approx(expected.mean(), abs=1e-6)
    t = loaded.signatures["predict_tensor"](images=tf.constant(x))
    np.testing.assert_allclose(t["mask_probabilities"].numpy(), small[..., 0], atol=1e-5)
    assert stored_values(info["path"]) == model.count_params()


def test_versions_names_and_saved_model_cli(tiny_runs, tmp_path):
    base = tmp_path / "models"
    assert export_run(tiny_runs["segmenter"], base, "seg")["version"] == 1
    assert export_run(tiny_runs["segmenter"], base, "seg")["version"] == 2
    with pytest.raises(TfBusError, match="version 2 exists already"):
        export_run(tiny_runs["segmenter"], base, "seg", version=2)
    assert export_run(tiny_runs["segmenter"], base, "seg", version=7)["version"] == 7
    assert sorted(p.name for p in (base / "seg").iterdir()) == ["1", "2", "7"], "no temporary folder left behind"
    for bad in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(TfBusError, match="model name"):
            export_run(tiny_runs["segmenter"], base, bad)
    with pytest.raises(TfBusError, match="config.json: missing"):
        export_run(tmp_path, base, "seg")
    with pytest.raises(TfBusError, match="must be one of none, largest. Received: 'biggest'"):
        export_run(tiny_runs["segmenter"], base, "seg", postprocess="biggest")
    with pytest.raises(TfBusError, match="applies to segmenters"):
        export_run(tiny_runs["classifier"], base, "cls", postprocess="largest")
    assert sorted(p.name for p in base.iterdir()) == ["seg"] and len(list((base / "seg").iterdir())) == 3
    cli = Path(sys.executable).with_name("saved_model_cli")
    r = subprocess.run([str(cli), "show", "--dir", str(base / "seg" / "1"), "--all"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert r.returncode == 0, r.stderr
    for text in ("signature_def['serving_default']", "signature_def['predict_tensor']", "mask_png_bytes",
                 "dtype: DT_STRING", "tensorflow/serving/predict"):
        assert text in r.stdout, text


def test_export_cli(tiny_runs, tmp_path):
    r = cli("export", tiny_runs["classifier"], "--model-base-path", tmp_path, "--name", "cls")  # in process
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cls" / "1" / "saved_model.pb").is_file()
    assert (tmp_path / "cls" / "1" / "assets.extra" / "tf_bus.json").is_file()


# ------------------------------------------------------------ a cross-validation's folds, averaged

@pytest.mark.parametrize("index, kind, key", [(0, "segmenter", "mask_probabilities"), (1, "classifier", "probabilities")])
def test_a_cross_validation_exports_the_mean_of_its_folds(two_cvs, tmp_path, images, index, kind, key):
    """`tf-bus export CV_DIR`: one SavedModel whose outputs are the mean of the fold models',
    at the median of the folds' thresholds; `predict --run CV_DIR` answers the same."""
    import json

    import keras

    from tf_bus.export import local_predictor

    cv = two_cvs[index]
    info = export_run(cv, tmp_path / "models", "ens")
    assert info["kind"] == kind and info["folds"] == 2 and info["source_run"] == str(cv.resolve())
    folds = [keras.saving.load_model(cv / f"fold_{k}" / "best.keras", compile=False) for k in range(2)]
    _, h, w, c = folds[0].input_shape
    x = np.stack([keras_input(images[k][1], (h, w), c) for k in ("grey_png", "rgb_png")])
    scale = 1.0 if kind == "classifier" else 1.0 / 255.0
    each = [np.asarray(m(x * scale, training=False), np.float32) for m in folds]
    # The tiny ResNets compute in mixed_bfloat16 (8 mantissa bits), and a traced graph rounds
    # differently from these eager calls: agreement to bfloat16's precision.
    atol = 1e-5 if all(layer.dtype_policy.compute_dtype == "float32" for layer in folds[0].layers) else 4e-3
    assert np.abs(each[0] - each[1]).max() > 5 * atol, "the folds differ, so their mean is neither"
    want = (each[0] + each[1]) / 2.0
    loaded = tf.saved_model.load(info["path"])
    got = loaded.signatures["predict_tensor"](images=tf.constant(x))[key].numpy()
    np.testing.assert_allclose(got, want if kind == "classifier" else want[..., 0], atol=atol)

    encoded = [images[k][1] for k in ("grey_png", "rgb_jpeg")]
    served = loaded.signatures["serving_default"](images=tf.constant(encoded))
    got_kind, local = local_predictor(cv)
    mine = local(encoded)
    assert got_kind == kind and sorted(mine) == sorted(served)
    for name, value in served.items():
        if value.dtype == tf.string:
            assert list(mine[name]) == list(value.numpy()), name
        else:
            np.testing.assert_allclose(mine[name], value.numpy(), atol=1e-6, err_msg=name)
    if kind == "segmenter":
        summary = json.loads((cv / "cross_validation.json").read_text())
        assert info["threshold"] == pytest.approx(float(np.median([f["threshold"] for f in summary["folds"]])))
        if info["postprocess"] == "none":  # the mask is the averaged probabilities at that threshold
            prob, size = served["mask_probabilities"].numpy()[0], served["image_size"].numpy()[0]
            mask = tf.io.decode_png(served["mask_png_bytes"][0]).numpy()[..., 0]
            np.testing.assert_array_equal(mask > 0, prob[:size[0], :size[1]] >= info["threshold"])


@pytest.mark.parametrize("folds, given, expected", [
    ([(0.4, "none"), (0.6, "largest"), (0.5, "largest")], (None, None), (0.5, "largest")),
    ([(0.4, "largest"), (0.7, "none")], (None, None), (0.55, "none")),  # a tie keeps the masks as they are
    ([(0.4, "largest"), (0.6, "largest")], (0.3, "none"), (0.3, "none")),  # what is given wins
    ([], (None, None), (0.5, "none")),
])
def test_fold_ensembles_threshold_and_post_processing(folds, given, expected):
    from tf_bus.export import fold_mask_settings

    summary = {"folds": [{"threshold": t, "postprocess": p} for t, p in folds]}
    threshold, postprocess = fold_mask_settings(summary, *given)
    assert (threshold, postprocess) == (pytest.approx(expected[0]), expected[1])


@pytest.mark.parametrize("damage, message", [
    ("cross_validation.json", "the cross-validation has not finished .no cross_validation.json.; run the same "
                              "`tf-bus train-segmenter --folds 2` command again"),
    ("fold_1/best.keras", "fold_1/best.keras: missing, so the fold ensemble would lack fold 1"),
])
def test_an_unfinished_cross_validation_is_not_exported(two_cvs, tmp_path, damage, message):
    import shutil

    cv = tmp_path / "cv"
    shutil.copytree(two_cvs[0], cv)
    (cv / damage).unlink()
    with pytest.raises(TfBusError, match=message):
        export_run(cv, tmp_path / "models", "ens")
    assert not (tmp_path / "models" / "ens").exists()
    (tmp_path / "x.png").write_bytes(png(np.zeros((8, 8), np.uint8)))
    r = cli("predict", "--run", cv, tmp_path / "x.png")
    assert r.returncode != 0 and re.search(message, r.stderr) and "Traceback" not in r.stderr, r.stderr


def test_a_fold_ensemble_needs_one_input_shape():
    import keras

    from tf_bus.export import fold_ensemble

    def tiny(size):
        x = keras.Input((size, size, 1))
        return keras.Model(x, keras.layers.Conv2D(1, 1)(x))

    with pytest.raises(TfBusError, match=r"different inputs \(\(16, 16, 1\), \(32, 32, 1\)\).*same --image-size"):
        fold_ensemble([tiny(16), tiny(32)])
    with pytest.raises(TfBusError, match="at least one model"):
        fold_ensemble([])
    single = fold_ensemble([tiny(16)])
    x = np.random.default_rng(0).random((2, 16, 16, 1)).astype("float32")
    np.testing.assert_allclose(single(x).numpy(), single.get_layer("fold_0")(x).numpy(), atol=1e-6)


def test_evaluate_segmenter_scores_the_folds_average_on_other_data(two_cvs, synthetic_release, prepared, tmp_path):
    """`evaluate-segmenter CV_DIR` scores what `export CV_DIR` serves, on data the CV did not
    use, and refuses the data it cross-validated; a threshold chosen then is what export uses."""
    import json
    import shutil

    from tf_bus.data.busi import read_release
    from tf_bus.data.split import make_split, save_splits
    from tf_bus.data.synthetic import make_synthetic
    from tf_bus.evaluation import evaluate_segmenter, mask_metrics, postprocess_mask, predict_split
    from tf_bus.export import fold_mask_settings, read_for_serving

    other = make_synthetic(tmp_path / "other", n=24, seed=11)
    splits = tmp_path / "splits.json"
    save_splits(make_split(read_release(other).infos), splits)
    cv = tmp_path / "cv"
    shutil.copytree(two_cvs[0], cv)
    result = evaluate_segmenter(cv, other, "train", splits_file=splits)  # data the CV never saw, any split
    threshold, postprocess = fold_mask_settings(json.loads((cv / "cross_validation.json").read_text()), None, None)
    assert result["settings"]["threshold"] == pytest.approx(threshold)
    assert result["settings"]["postprocess"] == postprocess
    folds = [{p[0]: p for p in predict_split(cv / f"fold_{k}", other, "train", splits_file=splits)} for k in range(2)]
    assert sorted(r["name"] for r in result["per_image"]) == sorted(folds[0]) == sorted(folds[1])
    assert any(r["lesion"] for r in result["per_image"]) and any(not r["lesion"] for r in result["per_image"])
    averaged = {p[0]: p for p in predict_split(cv, other, "train", splits_file=splits)}  # what was scored
    apart = 0.0
    for row in result["per_image"]:
        (_, _, p0, truth), (_, _, p1, _) = folds[0][row["name"]], folds[1][row["name"]]
        want = mask_metrics(postprocess_mask((p0 + p1) / 2.0 >= threshold, postprocess), truth, with_hd95=False)
        key = "dice" if want["lesion"] else "fp_area_fraction"
        assert row[key] == pytest.approx(want[key], abs=0.02), row["name"]
        np.testing.assert_allclose(averaged[row["name"]][2], (p0 + p1) / 2.0, atol=1e-4)
        apart = max(apart, float(np.abs(p0 - p1).max()))
    assert apart > 0.01, "the folds' maps differ, so their mean is neither"
    assert (cv / "eval_train" / "metrics.json").is_file()

    with pytest.raises(TfBusError, match="is a cross-validation of .*, so every case there trained some of its folds"):
        evaluate_segmenter(cv, synthetic_release, "test")
    with pytest.raises(TfBusError, match="is a cross-validation of .*, so every case there trained some of its folds"):
        evaluate_segmenter(cv, prepared, "test")  # a `tf-bus prepare` output of that same release

    (cv / "threshold.json").write_text(json.dumps({"threshold": 0.3, "postprocess": "largest"}))
    kind, _, got_threshold, got_postprocess, folds_count = read_for_serving(cv)
    assert (kind, got_threshold, got_postprocess, folds_count) == ("segmenter", 0.3, "largest", 2)
    assert read_for_serving(cv, 0.6, "none")[2:4] == (0.6, "none")


def test_evaluate_classifier_scores_the_folds_average_on_other_data(two_cvs, synthetic_release, tmp_path):
    """`evaluate-classifier CV_DIR`: the folds' probabilities averaged, on data the CV did not
    use; the CV's own data and `--checkpoint last` are refused."""
    import shutil

    from tf_bus.data.busi import read_release
    from tf_bus.data.split import make_split, save_splits
    from tf_bus.data.synthetic import make_synthetic
    from tf_bus.evaluation import evaluate_classifier

    other = make_synthetic(tmp_path / "other", n=24, seed=11)
    splits = tmp_path / "splits.json"
    save_splits(make_split(read_release(other).infos), splits)
    cv = tmp_path / "cv"
    shutil.copytree(two_cvs[1], cv)
    result = evaluate_classifier(cv, other, "train", splits_file=splits)
    folds = [{r["name"]: np.array(r["probabilities"]) for r in
              evaluate_classifier(cv / f"fold_{k}", other, "train", splits_file=splits)["per_image"]} for k in range(2)]
    assert sorted(r["name"] for r in result["per_image"]) == sorted(folds[0]) == sorted(folds[1])
    apart = 0.0
    for row in result["per_image"]:
        p0, p1 = folds[0][row["name"]], folds[1][row["name"]]
        np.testing.assert_allclose(row["probabilities"], (p0 + p1) / 2.0, atol=4e-3)  # bfloat16 ResNets
        apart = max(apart, float(np.abs(p0 - p1).max()))
    assert apart > 0.02, "the folds differ, so their mean is neither"
    assert result["settings"]["model"] == str(cv) and (cv / "eval_train" / "metrics.json").is_file()

    with pytest.raises(TfBusError, match="is a cross-validation of .*, so every case there trained some of its folds"):
        evaluate_classifier(cv, synthetic_release, "test")
    with pytest.raises(TfBusError, match="average is of its folds' best.keras; leave out --checkpoint last"):
        evaluate_classifier(cv, other, "test", splits_file=splits, checkpoint="last")
    with pytest.raises(TfBusError, match="not a train-classifier one; evaluate it with `tf-bus evaluate-segmenter`"):
        evaluate_classifier(two_cvs[0], other, "test", splits_file=splits)
