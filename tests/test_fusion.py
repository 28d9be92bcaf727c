"""Lesion descriptors (tf_bus.descriptors) and the stacked classifier (tf_bus.fusion, `tf-bus fuse`)."""

from __future__ import annotations

import csv
import functools
import json
import shutil

import numpy as np
import pytest

from conftest import CV_SEGMENTER_FLAGS, built_once, cli
from tf_bus.data.busi import TfBusError
from tf_bus.descriptors import DESCRIPTOR_NAMES, lesion_descriptors
from tf_bus.fusion import FEATURE_NAMES, BoostedTrees, fuse

H = W = 200
YY, XX = np.mgrid[:H, :W]


def _d(image, prob, threshold=0.5) -> dict[str, float]:
    return dict(zip(DESCRIPTOR_NAMES, lesion_descriptors(image, prob, threshold)))


def _disc(cy, cx, r):
    return ((YY - cy) ** 2 + (XX - cx) ** 2 <= r ** 2).astype(float)


def _rect(top, left, h, w):
    m = np.zeros((H, W))
    m[top:top + h, left:left + w] = 1
    return m


STAR = (np.hypot(YY - 100, XX - 100) <= 40 + 20 * np.cos(8 * np.arctan2(YY - 100, XX - 100))).astype(float)

SHAPES = [  # mask, and what its descriptors must say
    (_disc(80, 100, 30), dict(height_over_width=1.0, depth=80 / H), dict(circularity=(0.95, 1.0),
                                                                       solidity=(0.95, 1.0), area=(0.0695, 0.0720))),
    (_rect(50, 40, 20, 60), dict(height_over_width=20 / 60, solidity=1.0, area=1200 / (H * W), depth=59.5 / H), {}),
    (_rect(50, 90, 60, 20), dict(height_over_width=3.0), {}),  # taller than wide
    (STAR, {}, dict(circularity=(0.0, 0.3), solidity=(0.4, 0.7), margin_irregularity=(8.0, 11.0))),
    # an L: two 40x10 bars; the hull of their pixel corners is the L plus a 30x30 triangle
    (np.maximum(_rect(20, 20, 40, 10), _rect(50, 20, 10, 40)), dict(area=700 / (H * W), solidity=700 / (700 + 450)), {}),
    # a ring: its hole is filled, so the area is the disc's
    (_disc(100, 100, 30) - _disc(100, 100, 10), dict(area=_disc(100, 100, 30).sum() / (H * W)), {}),
]


@pytest.mark.parametrize("mask,exact,ranges", SHAPES)
def test_shape_descriptors_of_hand_made_masks(mask, exact, ranges):
    d = _d(np.full((H, W), 0.5), mask)
    for name, value in exact.items():
        assert d[name] == pytest.approx(value, rel=1e-9), name
    for name, (lo, hi) in ranges.items():
        assert lo <= d[name] <= hi, (name, d[name])
    assert d["components"] == 1 and d["max_probability"] == 1.0


@pytest.mark.parametrize("below,posterior", [(0.6, 0.4), (0.1, -0.1)], ids=["enhancement", "shadowing"])
def test_echo_descriptors(below, posterior):
    lesion = _rect(60, 80, 40, 40)
    image = np.full((H, W), 0.6)
    image[lesion > 0] = 0.2
    image[100:140, 80:120] = below  # the 8% of the height under the lesion (16 rows) lies inside this band
    d = _d(image, lesion)
    assert d["mean_inside"] == pytest.approx(0.2) and d["heterogeneity"] == pytest.approx(0.0, abs=1e-12)
    # The ring (4 px wide, square corners) around the lesion: 0.6 except where it dips into the band below.
    ring_below = 4 * 40  # 4 rows under the lesion, as wide as the band
    ring = (48 * 48) - 40 * 40
    assert d["mean_around"] == pytest.approx((0.6 * (ring - ring_below) + below * ring_below) / ring)
    assert d["contrast"] == pytest.approx(d["mean_inside"] - d["mean_around"])
    assert d["posterior"] == pytest.approx(posterior)


def _surround(left, right, inside=0.2):
    """A disc lesion at (100, 100) of grey ``inside``; the rest ``left`` left of the centroid's
    column and ``right`` from it on (octants with dx >= 0 are the right-hand ones)."""
    image = np.where(XX < 100, left, right).astype(float)
    image[_disc(100, 100, 30) > 0] = inside
    return image


def _blurred_disc():
    from scipy import ndimage

    return ndimage.uniform_filter(_surround(0.6, 0.6), 15)


MARGINS = [  # image, probabilities, and what the margin descriptors must say
    ("sharp", _surround(0.6, 0.6), _disc(100, 100, 30),
     dict(margin_contrast=0.4, margin_variation=0.0, around_variation=0.0, margin_fuzziness=0.0),
     dict(margin_sharpness=(0.05, 0.2), radius_variation=(0.0, 0.05))),
    ("blurred", _blurred_disc(), _disc(100, 100, 30), dict(margin_fuzziness=0.0),
     dict(margin_sharpness=(0.005, 0.03), margin_contrast=(0.1, 0.3))),
    # indistinct on the right: no contrast there, 0.4 on the left -> 0.2 over the octants
    ("half indistinct", _surround(0.6, 0.2), _disc(100, 100, 30), dict(margin_variation=0.2, around_variation=0.2),
     dict(margin_contrast=(0.19, 0.21))),
    # 0.75 inside, 0.25 in the ring: 4 p (1 - p) = 0.75 on both sides of the outline
    ("unsure U-Net", _surround(0.6, 0.6), 0.5 + 0.5 * _disc(100, 100, 30) - 0.25 * _disc(100, 100, 45),
     dict(margin_fuzziness=0.75), {}),
    ("elongated", _surround(0.6, 0.6), _rect(90, 40, 20, 120), {}, dict(radius_variation=(0.3, 0.8))),
]


@pytest.mark.parametrize("image,prob,exact,ranges", [m[1:] for m in MARGINS], ids=[m[0] for m in MARGINS])
def test_margin_descriptors(image, prob, exact, ranges):
    d = _d(image, prob, 0.7)
    for name, value in exact.items():
        assert d[name] == pytest.approx(value, abs=1e-9), name
    for name, (lo, hi) in ranges.items():
        assert lo <= d[name] <= hi, (name, d[name])


def test_empty_and_several_components():
    prob = np.full((H, W), 0.1)
    prob[0, 0] = 0.4
    d = _d(np.full((H, W), 0.5), prob)
    assert d["components"] == 0 and d["max_probability"] == pytest.approx(0.4)
    assert all(d[n] == 0.0 for n in DESCRIPTOR_NAMES if n not in ("max_probability", "top_probability"))
    assert d["top_probability"] == pytest.approx((0.4 + 79 * 0.1) / 80)  # 0.2% of 40,000 pixels
    two = np.maximum(_rect(10, 10, 10, 10), _rect(100, 100, 20, 30))
    d = _d(np.full((H, W), 0.5), two)
    assert d["components"] == 2 and d["area"] == pytest.approx(600 / (H * W))  # the larger one
    assert d["mask_fraction"] == pytest.approx(700 / (H * W))


def _blobs(seed, shape=(90, 70), sigma=2.5):
    from scipy import ndimage

    p = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    return (p - p.min()) / (p.max() - p.min())


def _tied():  # three 3x3 squares: the largest is a tie, won by the first in raster order
    m = np.zeros((30, 30))
    m[2:5, 20:23] = m[10:13, 2:5] = m[20:23, 20:23] = 1
    return m


def _framed():  # touches three image borders; its holes: one inside, one open to the image edge
    m = np.zeros((40, 50))
    m[0:30, 0:50] = 1
    m[10:15, 10:15] = 0
    m[20:25, 0:3] = 0
    m[0, 20:25] = 0
    return m


TF_CASES = [(mask, 0.5) for mask, _, _ in SHAPES] + [
    (_tied(), 0.5), (np.zeros((20, 30)), 0.5), (np.ones((20, 30)), 0.5), (_framed(), 0.5),
    (np.pad(np.ones((1, 1)), ((7, 12), (3, 9))), 0.5),  # one pixel
    (np.pad(np.ones((1, 9)), ((4, 5), (2, 3))), 0.5), (np.pad(np.ones((9, 1)), ((4, 5), (2, 3))), 0.5),  # lines
    (_blobs(0), 0.5), (_blobs(1), 0.7), (_blobs(2, (41, 128), 1.5), 0.4), (_blobs(3, (128, 41), 4.0), 0.6),
]


@functools.cache
def _descriptors_graph():
    """``lesion_descriptors_tf`` as one graph for every image size, as the exported fusion
    runs it on decoded images of any size (traced once per test process, not once per case)."""
    import tensorflow as tf

    from tf_bus.descriptors import lesion_descriptors_tf

    image = tf.TensorSpec([None, None], tf.float64)
    return tf.function(lesion_descriptors_tf, input_signature=[image, image, tf.TensorSpec([], tf.float64)])


@pytest.mark.parametrize("image,prob,threshold",
                         [(None, prob, t) for prob, t in TF_CASES] + [(m[1], m[2], 0.7) for m in MARGINS])
def test_tensorflow_descriptors_equal_numpys(image, prob, threshold):
    """What an exported fusion measures while serving is what `fuse` measured."""
    if image is None:
        image = np.random.default_rng(prob.size).random(prob.shape)
    expected = lesion_descriptors(image, prob, threshold)
    got = _descriptors_graph()(np.asarray(image, np.float64), np.asarray(prob, np.float64), np.float64(threshold))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_descriptors_need_matching_sizes():
    with pytest.raises(ValueError, match=r"image \(10, 10\) and probabilities \(20, 20\)"):
        lesion_descriptors(np.zeros((10, 10)), np.zeros((20, 20)), 0.5)


@pytest.mark.parametrize("trees,depth,classes", [(30, 2, 3), (10, 3, 3), (20, 1, 3)])
def test_boosted_trees_give_scikit_learns_probabilities(trees, depth, classes, tmp_path):
    from sklearn.ensemble import GradientBoostingClassifier

    rng = np.random.default_rng(trees)
    x = rng.normal(size=(150, 5))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    fitted = BoostedTrees.fit(x, y, feature_names=list("abcde"), class_names=["p", "q", "r"], trees=trees, depth=depth,
                              learning_rate=0.1, seed=0)
    reference = GradientBoostingClassifier(n_estimators=trees, max_depth=depth, learning_rate=0.1, random_state=0).fit(x, y)
    test = rng.normal(size=(40, 5))
    np.testing.assert_allclose(fitted.predict_proba(test), reference.predict_proba(test), atol=1e-10)
    # The same trees as TensorFlow ops (what an exported fusion runs), on the test points and
    # on points lying exactly on split thresholds (x <= threshold goes left in both).
    on_split = test.copy()
    splits = [(f, t) for stage in fitted.trees for tree in stage for f, t in zip(tree["feature"], tree["threshold"])
              if f >= 0]
    for i, (f, t) in enumerate(splits[:len(on_split)]):
        on_split[i, f] = t
    for points in (test, on_split):
        np.testing.assert_allclose(fitted.tf_predict_proba(points).numpy(), fitted.predict_proba(points), atol=1e-12)
    fitted.save(tmp_path / "m.json")
    again = BoostedTrees.load(tmp_path / "m.json")
    np.testing.assert_array_equal(again.predict_proba(test), fitted.predict_proba(test))
    importance = fitted.importances()
    assert sum(importance.values()) == pytest.approx(1.0)
    assert importance["a"] > importance["e"] and importance["b"] > importance["e"], "the label depends on a and b"
    with pytest.raises(TfBusError, match="takes 5 features"):
        fitted.predict_proba(test[:, :4])


def test_boosted_trees_need_every_class():
    with pytest.raises(TfBusError, match="no normal case"):
        BoostedTrees.fit(np.zeros((4, 2)), np.array([0, 1, 0, 1]), feature_names=["a", "b"],
                         class_names=["benign", "malignant", "normal"])


def test_a_damaged_fusion_model_file_is_named(tmp_path):
    with pytest.raises(TfBusError, match="no such fusion model"):
        BoostedTrees.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(TfBusError, match="not a fusion model"):
        BoostedTrees.load(tmp_path / "bad.json")


# ----------------------------------------------------------------------------- end to end



@pytest.fixture(scope="module")
def fused(two_cvs, tmp_path_factory):
    seg, clf = two_cvs

    def build(root):
        r = cli("fuse", seg, clf, "--out", root / "fused", "--trees", "20", "--resamples", "200")
        assert r.returncode == 0, r.stderr[-3000:]
        assert "fused - ResNet accuracy" in r.stdout

    return built_once(tmp_path_factory, "fused", build) / "fused"


@pytest.mark.slow
def test_fuse_stacks_two_cross_validations(two_cvs, fused, synthetic_release):
    from tf_bus.evaluation import classification_metrics, predict_split

    seg, clf = two_cvs
    out = fused
    result = json.loads((out / "cross_validation.json").read_text())
    clf_cv = json.loads((clf / "cross_validation.json").read_text())
    per = result["per_image"]
    assert sorted(p["name"] for p in per) == sorted(p["name"] for p in clf_cv["per_image"])
    folds = {p["name"]: p["fold"] for p in clf_cv["per_image"]}
    assert all(p["fold"] == folds[p["name"]] for p in per)
    assert np.allclose([sum(p["probabilities"]) for p in per], 1.0)
    pooled = classification_metrics([p["label"] for p in per], [p["probabilities"] for p in per])
    assert result["pooled"] == json.loads(json.dumps(pooled))
    assert result["resnet_alone"]["accuracy"] == pytest.approx(clf_cv["pooled"]["accuracy"])
    assert result["against_resnet"]["accuracy"]["difference"] == pytest.approx(
        result["pooled"]["accuracy"] - clf_cv["pooled"]["accuracy"])
    for name in ("confusion_matrix.png", "roc.png", "calibration.png", "importance.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

    # descriptors.csv: every case, and each fold's cases measured again by hand from that fold's U-Net.
    from PIL import Image

    rows = {r["name"]: r for r in csv.DictReader((out / "descriptors.csv").open())}
    assert len(rows) == len(per) and list(next(iter(rows.values())))[-len(DESCRIPTOR_NAMES):] == list(DESCRIPTOR_NAMES)
    seg_cv = json.loads((seg / "cross_validation.json").read_text())
    for k in (0, 1):
        for name, image_path, prob, _ in predict_split(seg / f"fold_{k}", synthetic_release, "test", tta=True,
                                                       splits_file=seg / f"fold_{k}" / "splits.json")[:3]:
            image = np.asarray(Image.open(image_path).convert("L"), np.float64) / 255.0
            expected = lesion_descriptors(image, prob, seg_cv["folds"][k]["threshold"])
            assert int(rows[name]["fold"]) == k
            np.testing.assert_allclose([float(rows[name][n]) for n in DESCRIPTOR_NAMES], expected, rtol=1e-5, atol=1e-6)
    rows = list(rows.values())

    # The model fitted on every case reads back and applies to the table's features.
    model = BoostedTrees.load(out / "fusion_model.json")
    assert model.feature_names == list(FEATURE_NAMES[:3 + len(DESCRIPTOR_NAMES)]), "no presence U-Net, no presence"
    assert result["settings"]["presence_cv"] is None
    x = np.c_[np.log(np.clip([[float(r[f"p_{c}"]) for c in ("benign", "malignant", "normal")] for r in rows],
                             1e-6, 1)), [[float(r[n]) for n in DESCRIPTOR_NAMES] for r in rows]]
    assert model.predict_proba(x).shape == (len(rows), 3)

    # tf-bus compare reads the fused result as a classifier cross-validation.
    r = cli("compare", clf, out, "--resamples", "200")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "accuracy" in r.stdout


@pytest.mark.slow
def test_fuse_predict_repeats_each_folds_held_out_outputs(two_cvs, fused, synthetic_release, tmp_path):
    from tf_bus.config import CLASS_NAMES
    from tf_bus.fusion import features, predict_fused

    _, clf = two_cvs
    rows = list(csv.DictReader((fused / "descriptors.csv").open()))
    chosen = [r for r in rows if r["fold"] == "0"][:2] + [r for r in rows if r["fold"] == "1"][:2]
    paths = [synthetic_release / r["class"] / f"{r['name']}.png" for r in chosen]
    resnet_cv = {p["name"]: p["probabilities"] for p in json.loads((clf / "cross_validation.json").read_text())["per_image"]}
    trees = BoostedTrees.load(fused / "fusion_model.json")
    for row, out in zip(chosen, predict_fused(fused, paths)):
        assert [f["fold"] for f in out["folds"]] == [0, 1]
        own = out["folds"][int(row["fold"])]  # the fold that held this case out scored it in the CV
        np.testing.assert_allclose([own["descriptors"][n] for n in DESCRIPTOR_NAMES],
                                   [float(row[n]) for n in DESCRIPTOR_NAMES], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(own["resnet"], resnet_cv[row["name"]], atol=2e-6)
        for f in out["folds"]:
            x = features([f["resnet"]], [[f["descriptors"][n] for n in DESCRIPTOR_NAMES]])
            np.testing.assert_allclose(f["fused"], trees.predict_proba(x)[0], atol=1e-12)
        mean = np.mean([f["fused"] for f in out["folds"]], axis=0)
        np.testing.assert_allclose([out["probabilities"][c] for c in CLASS_NAMES], mean, atol=1e-12)
        assert out["class"] == CLASS_NAMES[int(np.argmax(mean))]
    # A fusion fitted before the margin descriptors existed (3 + 15 features) takes its own columns.
    older = tmp_path / "older"
    shutil.copytree(fused, older)
    x = features([[float(r[f"p_{c}"]) for c in CLASS_NAMES] for r in rows],
                 [[float(r[n]) for n in DESCRIPTOR_NAMES] for r in rows])[:, :18]
    old_trees = BoostedTrees.fit(x, np.array([int(r["label"]) for r in rows]), feature_names=FEATURE_NAMES[:18],
                                 class_names=list(CLASS_NAMES), trees=5)
    old_trees.save(older / "fusion_model.json")
    [out] = predict_fused(older, paths[:1])
    for f in out["folds"]:
        x = features([f["resnet"]], [[f["descriptors"][n] for n in DESCRIPTOR_NAMES]])[:, :18]
        np.testing.assert_allclose(f["fused"], old_trees.predict_proba(x)[0], atol=1e-12)
    unknown = BoostedTrees.fit(x.repeat(3, 0), np.arange(3), feature_names=[*FEATURE_NAMES[:17], "spiculation"],
                               class_names=list(CLASS_NAMES), trees=2)
    unknown.save(older / "fusion_model.json")
    with pytest.raises(TfBusError, match="takes spiculation, which this tf-bus does not measure"):
        predict_fused(older, paths[:1])
    folder = tmp_path / "to_classify"  # a folder: its image, not its mask
    folder.mkdir()
    shutil.copy(paths[0], folder)
    shutil.copy(paths[0].with_name(f"{paths[0].stem}_mask.png"), folder)
    r = cli("fuse-predict", fused, folder)
    assert r.returncode == 0, r.stderr[-3000:]
    [line] = r.stdout.splitlines()
    assert json.loads(line)["class"] in CLASS_NAMES and "folds" not in json.loads(line)
    assert json.loads(line)["image"] == str(folder / paths[0].name)
    r = cli("fuse-predict", fused, paths[0].with_name("nope.png"))
    assert r.returncode == 2 and "nope.png: no such image file" in r.stderr and "Traceback" not in r.stderr
    moved = tmp_path / "moved"
    shutil.copytree(fused, moved)
    result = json.loads((moved / "cross_validation.json").read_text())
    result["settings"]["segmenter_cv"] = str(tmp_path / "gone")
    (moved / "cross_validation.json").write_text(json.dumps(result))
    r = cli("fuse-predict", moved, paths[0])
    assert r.returncode == 2 and "gone: the cross-validation" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_exported_fusion_serves_what_fuse_predict_computes(two_cvs, fused, synthetic_release, tmp_path):
    """`tf-bus export FUSED_DIR`: one SavedModel (both folds' U-Net and ResNet, the
    descriptors and the trees as TensorFlow ops) answers as `fuse-predict`, in process and
    through the project's TF Serving-protocol server over REST and gRPC."""
    import tensorflow as tf

    from tf_bus.config import CLASS_NAMES
    from tf_bus.fusion import load_fused, predict_fused
    from tf_bus.serving.client import predict_images
    from tf_bus.serving.server import serve_on_loopback

    rows = list(csv.DictReader((fused / "descriptors.csv").open()))
    chosen = [r for r in rows if r["fold"] == "0"][:2] + [r for r in rows if r["fold"] == "1"][:2]
    paths = [synthetic_release / r["class"] / f"{r['name']}.png" for r in chosen]
    expected = predict_fused(fused, paths)
    r = cli("export", fused, "--model-base-path", tmp_path / "models", "--name", "busi_fused")
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout)
    assert info["kind"] == "fusion" and info["path"] == str(tmp_path / "models" / "busi_fused" / "1")
    assert [f["fold"] for f in info["folds"]] == [0, 1] and info["signatures"] == ["serving_default"]
    assert json.loads((tmp_path / "models/busi_fused/1/assets.extra/tf_bus.json").read_text())["kind"] == "fusion"

    reader = tf.train.load_checkpoint(str(tmp_path / "models/busi_fused/1/variables/variables"))
    stored = sum(int(np.prod(s)) for n, s in reader.get_variable_to_shape_map().items() if n != "_CHECKPOINTABLE_OBJECT_GRAPH")
    assert stored == sum(f.unet.count_params() + f.resnet.count_params() for f in load_fused(fused).folds), \
        "every fold's weights, each stored once"

    images = [p.read_bytes() for p in paths]
    served = tf.saved_model.load(info["path"]).signatures["serving_default"](images=tf.constant(images))
    want_desc = [[[f["descriptors"][n] for n in DESCRIPTOR_NAMES] for f in e["folds"]] for e in expected]
    np.testing.assert_allclose(served["lesion_descriptors"].numpy(), want_desc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(served["resnet_probabilities"].numpy(), [[f["resnet"] for f in e["folds"]] for e in expected],
                               atol=1e-6)
    np.testing.assert_allclose(served["fold_probabilities"].numpy(), [[f["fused"] for f in e["folds"]] for e in expected],
                               atol=1e-6)
    want = [[e["probabilities"][c] for c in CLASS_NAMES] for e in expected]
    np.testing.assert_allclose(served["probabilities"].numpy(), want, atol=1e-6)
    assert [n.decode() for n in served["class_names"].numpy()] == [e["class"] for e in expected]

    server = serve_on_loopback(tmp_path / "models", ["busi_fused"], tmp_path / "models.config")
    try:
        for protocol, port in (("rest", server.rest_port), ("grpc", server.grpc_port)):
            out = predict_images(images, "busi_fused", server=f"127.0.0.1:{port}", protocol=protocol)
            np.testing.assert_allclose(out["probabilities"], want, atol=1e-6)
            assert np.asarray(out["lesion_descriptors"]).shape == (len(images), 2, len(DESCRIPTOR_NAMES))
    finally:
        server.stop()

    r = cli("export", fused, "--model-base-path", tmp_path / "models", "--name", "busi_fused", "--threshold", "0.5")
    assert r.returncode == 2 and "leave out --threshold" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in (tmp_path / "models" / "busi_fused").iterdir()) == ["1"]


@pytest.fixture(scope="module")
def fused_presence(two_cvs, tmp_path_factory, synthetic_release):
    """The shared CVs fused with a presence U-Net: a third 2-fold CV, trained on every image."""
    seg, clf = two_cvs

    def build(root):
        r = cli("train-segmenter", "--data", synthetic_release, "--out", root / "pres", "--folds", "2",
                 *CV_SEGMENTER_FLAGS, "--no-lesion-only", "--seed", "4")
        assert r.returncode == 0, r.stderr[-3000:]
        r = cli("fuse", seg, clf, "--presence-cv", root / "pres", "--out", root / "fused", "--trees", "20",
                 "--resamples", "200")
        assert r.returncode == 0, r.stderr[-3000:]

    root = built_once(tmp_path_factory, "fused-presence", build)
    return root / "pres", root / "fused"


@pytest.mark.slow
def test_a_presence_unet_joins_the_features_in_fuse_predict_and_export(two_cvs, fused_presence, synthetic_release,
                                                                       tmp_path):
    """`fuse --presence-cv`: the presence descriptors of the held-out masks of the second U-Net
    are in descriptors.csv and the trees' inputs; `fuse-predict` and the export compute them
    again from that U-Net."""
    import tensorflow as tf
    from PIL import Image

    from tf_bus.config import CLASS_NAMES
    from tf_bus.evaluation import predict_split
    from tf_bus.fusion import PRESENCE_DESCRIPTORS, PRESENCE_NAMES, features, load_fused, predict_fused

    seg, clf = two_cvs
    pres, out = fused_presence
    result = json.loads((out / "cross_validation.json").read_text())
    assert result["settings"]["presence_cv"] == str(pres) and result["settings"]["features"] == list(FEATURE_NAMES)
    trees = BoostedTrees.load(out / "fusion_model.json")
    assert trees.feature_names == list(FEATURE_NAMES) and FEATURE_NAMES[-len(PRESENCE_NAMES):] == PRESENCE_NAMES
    rows = {r["name"]: r for r in csv.DictReader((out / "descriptors.csv").open())}
    assert list(next(iter(rows.values())))[-len(PRESENCE_NAMES):] == list(PRESENCE_NAMES)
    pres_cv = json.loads((pres / "cross_validation.json").read_text())
    for k in (0, 1):  # each fold's cases measured again by hand from that fold's presence U-Net
        for name, image_path, prob, _ in predict_split(pres / f"fold_{k}", synthetic_release, "test", tta=True,
                                                       splits_file=pres / f"fold_{k}" / "splits.json")[:3]:
            image = np.asarray(Image.open(image_path).convert("L"), np.float64) / 255.0
            measured = lesion_descriptors(image, prob, pres_cv["folds"][k]["threshold"])
            expected = [measured[DESCRIPTOR_NAMES.index(n)] for n in PRESENCE_DESCRIPTORS]
            np.testing.assert_allclose([float(rows[name][n]) for n in PRESENCE_NAMES], expected, rtol=1e-5, atol=1e-6)

    chosen = [r for r in rows.values() if r["fold"] == "0"][:2] + [r for r in rows.values() if r["fold"] == "1"][:2]
    paths = [synthetic_release / r["class"] / f"{r['name']}.png" for r in chosen]
    predicted = predict_fused(out, paths)
    for row, got in zip(chosen, predicted):
        own = got["folds"][int(row["fold"])]
        np.testing.assert_allclose([own["presence"][n] for n in PRESENCE_NAMES], [float(row[n]) for n in PRESENCE_NAMES],
                                   rtol=1e-5, atol=1e-6)
        for f in got["folds"]:
            x = features([f["resnet"]], [[f["descriptors"][n] for n in DESCRIPTOR_NAMES]],
                         [[f["presence"][n] for n in PRESENCE_NAMES]])
            np.testing.assert_allclose(f["fused"], trees.predict_proba(x)[0], atol=1e-12)

    r = cli("export", out, "--model-base-path", tmp_path / "models", "--name", "busi_fused")
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout)
    assert info["presence_descriptors"] == list(PRESENCE_NAMES) and "presence_threshold" in info["folds"][0]
    reader = tf.train.load_checkpoint(str(tmp_path / "models/busi_fused/1/variables/variables"))
    stored = sum(int(np.prod(s)) for n, s in reader.get_variable_to_shape_map().items() if n != "_CHECKPOINTABLE_OBJECT_GRAPH")
    assert stored == sum(f.unet.count_params() + f.resnet.count_params() + f.presence.unet.count_params()
                         for f in load_fused(out).folds), "both U-Nets and the ResNet of every fold, stored once"
    served = tf.saved_model.load(info["path"]).signatures["serving_default"](
        images=tf.constant([p.read_bytes() for p in paths]))
    np.testing.assert_allclose(served["presence_descriptors"].numpy(),
                               [[[f["presence"][n] for n in PRESENCE_NAMES] for f in e["folds"]] for e in predicted],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(served["probabilities"].numpy(),
                               [[e["probabilities"][c] for c in CLASS_NAMES] for e in predicted], atol=1e-6)

    # A lesion-only U-Net CV is refused as the presence U-Net, before anything is measured.
    r = cli("fuse", seg, clf, "--presence-cv", seg, "--out", tmp_path / "refused")
    assert r.returncode == 2 and "trained on lesion images only" in r.stderr and "--no-lesion-only" in r.stderr
    assert not (tmp_path / "refused").exists()
    # Trees that take presence descriptors with no presence CV named: a clear error.
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    result["settings"]["presence_cv"] = None
    (damaged / "cross_validation.json").write_text(json.dumps(result))
    with pytest.raises(TfBusError, match="takes presence descriptors"):
        predict_fused(damaged, paths[:1])


@pytest.mark.slow
@pytest.mark.parametrize("damage,message", [
    ("swap", "is a segmenter cross-validation; pass a classifier's"),
    ("fold", "stacking needs the same folds"),
    ("foreign", "is not in"),
    ("missing", "no cross_validation.json"),
])
def test_fuse_refuses_cross_validations_that_do_not_pair(two_cvs, tmp_path, damage, message):
    seg, clf = two_cvs
    if damage == "swap":
        args = (seg, seg)
    else:
        bad = tmp_path / "clf"
        shutil.copytree(clf, bad)
        file = bad / "cross_validation.json"
        result = json.loads(file.read_text())
        if damage == "fold":
            result["per_image"][0]["fold"] = 1 - result["per_image"][0]["fold"]
        elif damage == "foreign":
            result["per_image"][0]["name"] = "benign (9999)"
        file.write_text(json.dumps(result))
        if damage == "missing":
            file.unlink()
        args = (seg, bad)
    r = cli("fuse", *args, "--out", tmp_path / "out")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists(), "nothing written for a refused fusion"


def test_fuse_checks_its_settings(tmp_path):
    with pytest.raises(TfBusError, match="trees=0"):
        fuse(tmp_path, tmp_path, tmp_path / "out", trees=0)


@pytest.mark.parametrize("tta", [False, True])
def test_fold_outputs_do_not_depend_on_the_batching(synthetic_release, tta):
    import tensorflow as tf

    from tf_bus.fusion import _fold_probabilities
    from tf_bus.models.unet import UNet

    model = UNet(image_size=(32, 32), channels=1, depth=2, base_filters=4)
    contents = [tf.constant(p.read_bytes()) for p in sorted(synthetic_release.glob("benign/*).png"))[:5]]
    whole = _fold_probabilities(model, contents, 1, (32, 32), "unit", tta, np.float32)
    pieces = _fold_probabilities(model, contents, 1, (32, 32), "unit", tta, np.float32, batch=2)
    assert len(whole) == len(pieces) == 5 and whole[0].shape == (32, 32, 1)
    for a, b in zip(whole, pieces):
        np.testing.assert_allclose(a, b, atol=1e-6)
    if tta:  # the mirrored pass is mirrored back: a mirrored input gives the mirrored map
        mirrored = [tf.io.encode_png(tf.reverse(tf.io.decode_png(c, 1), [1])) for c in contents[:1]]
        again = _fold_probabilities(model, mirrored, 1, (32, 32), "unit", tta, np.float32)
        np.testing.assert_allclose(again[0], whole[0][:, ::-1], atol=1e-5)
