"""`tf-bus explain`: Grad-CAM against CAM computed by hand, the files and lines it writes,
and its refusals."""

from __future__ import annotations

import json
import shutil

import keras
import numpy as np
import pytest
from PIL import Image

from conftest import TEST_BACKBONE, backbone_weights
from tf_bus.data.busi import TfBusError
from tf_bus.explain import _lesion_mask, explain_images, grad_cam
from tf_bus.models.classifier import build_classifier, inference_model


def _randomised_head(model, seed: int = 0):
    """A dense head with weights of both signs and unequal classes."""
    dense = model.get_layer("probabilities")
    rng = np.random.default_rng(seed)
    dense.kernel.assign(rng.normal(0.0, 1.0, dense.kernel.shape).astype("float32"))
    dense.bias.assign(rng.normal(0.0, 1.0, dense.bias.shape).astype("float32"))
    return model


def _images(n: int, size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 1)).astype("float32")


#: the feature-map cell (row, column) each class is made to look at in the first image
PLANTED = [(0, 0), (1, 2), (2, 1)]


@pytest.mark.parametrize("target", [None, 0, 1, 2])
def test_grad_cam_equals_cam_and_finds_the_planted_evidence(target):
    # GAP + dense: d y_c / d A_k(i, j) = w_kc / (h w), so Grad-CAM = ReLU(sum_k w_kc A_k) / max.
    model = build_classifier(TEST_BACKBONE, None, image_size=(96, 96), channels=1)
    x = _images(3, 96)
    features = np.asarray(keras.Model(model.input, model.get_layer("pool").input)(x, training=False), np.float64)
    assert features.shape[1:3] == (3, 3)  # 96 px / stride 32
    # Class c's weights point from the first image's mean feature to its cell PLANTED[c], less
    # their part along the mean: then the image's map sums to 0 over its cells (never all 0).
    centre = features[0].mean(axis=(0, 1))
    toward = np.stack([features[0][cell] - centre for cell in PLANTED], axis=1)
    kernel = toward - np.outer(centre, centre @ toward) / (centre @ centre)
    dense = model.get_layer("probabilities")
    dense.kernel.assign((kernel / np.linalg.norm(kernel, axis=0)).astype("float32"))
    kernel = np.asarray(dense.kernel, np.float64)

    cams, prob, explained = grad_cam(model, x, target)
    expected_classes = prob.argmax(1) if target is None else np.full(3, target)
    np.testing.assert_array_equal(explained, expected_classes)
    np.testing.assert_allclose(prob, np.asarray(model(x, training=False)), rtol=1e-5, atol=1e-6)
    assert cams.shape == (3, 3, 3)
    for cam, f, c in zip(cams, features, expected_classes):
        by_hand = np.maximum(f @ kernel[:, c], 0.0)
        by_hand = by_hand / by_hand.max() if by_hand.max() > 0 else by_hand
        np.testing.assert_allclose(cam, by_hand, atol=1e-4)
    assert np.unravel_index(np.argmax(cams[0]), (3, 3)) == PLANTED[expected_classes[0]]
    assert cams[0].max() == pytest.approx(1.0) and cams[0].min() < 0.9


def test_grad_cam_runs_through_the_lesion_head():
    trained = build_classifier(TEST_BACKBONE, None, image_size=(64, 64), channels=1, mask_loss_weight=1.0,
                               lesion_pooling=True)
    model = _randomised_head(inference_model(trained), seed=2)
    x = _images(2, 64, seed=4)
    maps = [grad_cam(model, x, k)[0] for k in range(3)]
    for m in maps:
        assert m.shape == (2, 2, 2) and np.isfinite(m).all() and 0.0 <= m.min() and m.max() <= 1.0
    assert not all(np.allclose(maps[0], m) for m in maps[1:])  # the class explained matters


def test_grad_cam_refuses_other_models_and_classes():
    plain = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    with pytest.raises(TfBusError, match="no layers named `pool` and `probabilities`"):
        grad_cam(plain, np.zeros((1, 8, 8, 1)))
    model = build_classifier(TEST_BACKBONE, None, image_size=(64, 64), channels=1)
    with pytest.raises(TfBusError, match="target class 3 is not one of the model's classes 0..2"):
        grad_cam(model, _images(1, 64), 3)


@pytest.fixture(scope="module")
def run_64(tmp_path_factory, prepared):
    """A classifier run at 64 px (a 2 x 2 map), head-only over a local backbone file."""
    from tf_bus.config import ClassifierConfig
    from tf_bus.training.classification import train_classifier

    root = tmp_path_factory.mktemp("explain")
    weights = backbone_weights(root / "backbone.weights.h5", size=64)
    cfg = ClassifierConfig(backbone=TEST_BACKBONE, image_size=(64, 64), weights=str(weights), head_epochs=1, epochs=1,
                           batch_size=8, warmup_epochs=0, time_budget_minutes=0)
    train_classifier(prepared, root / "run", cfg, verbose=0)
    return root / "run"


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["benign (3)", "case [1]", "odd*name"])
def test_the_lesion_is_the_union_of_its_masks_whatever_the_name(stem, tmp_path):
    size = (12, 10)
    first, second = np.zeros(size, np.uint8), np.zeros(size, np.uint8)
    first[1:3, 1:3], second[6:9, 4:6] = 255, 255
    Image.fromarray(np.zeros(size, np.uint8)).save(tmp_path / f"{stem}.png")
    Image.fromarray(first).save(tmp_path / f"{stem}_mask.png")
    Image.fromarray(second).save(tmp_path / f"{stem}_mask_1.png")
    Image.fromarray(np.full(size, 255, np.uint8)).save(tmp_path / f"{stem}x_mask.png")  # another case's mask
    lesion = _lesion_mask(tmp_path / f"{stem}.png", size)
    assert lesion.sum() == 4 + 6 and lesion[1, 1] and lesion[8, 5] and not lesion[0, 0]
    assert _lesion_mask(tmp_path / f"{stem}.png", (10, 12)) is None  # masks of another size: none


def test_explain_cli_writes_maps_and_lines(run_64, synthetic_release, tmp_path, capsys):
    from tf_bus.cli import main

    folder = synthetic_release / "benign"
    out = tmp_path / "maps"
    assert main(["explain", str(run_64), str(folder), str(synthetic_release / "normal" / "normal (1).png"),
                 "--out", str(out), "--batch-size", "5"]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    images = sorted(p for p in folder.iterdir() if "_mask" not in p.name)
    assert len(lines) == len(images) + 1
    scored, chance, distances = 0, 0.0, []
    for line in lines:
        image = Image.open(line["image"])
        heat = np.asarray(Image.open(line["heatmap"]))
        overlay = Image.open(line["gradcam"])
        assert heat.shape == (image.height, image.width) and overlay.size == image.size and overlay.mode == "RGB"
        assert line["class"] == max(line["probabilities"], key=line["probabilities"].get)
        assert line["explained"] == line["class"]  # --target predicted
        assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        if line["peak"] is not None:
            assert heat[tuple(line["peak"])] == heat.max() == 255
        if "normal" in line["image"]:
            assert line["peak_in_lesion"] is line["peak_distance_to_lesion"] is None  # nothing to point at
        elif line["peak"] is not None:
            mask = np.asarray(Image.open(line["image"].replace(".png", "_mask.png")).convert("L")) > 127
            for extra in sorted(folder.glob(f"{line['image'].rsplit('/', 1)[1][:-4]}_mask_*.png")):
                mask |= np.asarray(Image.open(extra).convert("L")) > 127
            assert line["peak_in_lesion"] is bool(mask[tuple(line["peak"])])
            rows, cols = np.nonzero(mask)
            nearest = np.hypot(rows - line["peak"][0], cols - line["peak"][1]).min()
            assert line["peak_distance_to_lesion"] == pytest.approx(nearest, abs=0.01)
            assert (line["peak_distance_to_lesion"] == 0) is line["peak_in_lesion"]
            assert line["lesion_area_fraction"] == pytest.approx(mask.mean(), abs=1e-6)
            scored += 1
            chance += mask.mean()
            distances.append(line["peak_distance_to_lesion"])
    assert (f"in the lesion in {sum(1 for line in lines if line['peak_in_lesion'])} of {scored} images with a lesion "
            f"mask (a point drawn at random: {chance:.1f} expected); median distance from the lesion "
            f"{np.median(distances):.1f} px") in captured.err

    # --target: every image explained for one class; its probabilities do not change.
    assert main(["explain", str(run_64), str(folder), "--out", str(tmp_path / "malignant"),
                 "--target", "malignant"]) == 0
    again = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {line["explained"] for line in again} == {"malignant"}
    assert [line["probabilities"] for line in again] == [line["probabilities"] for line in lines[:-1]]


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("segmenter", "is a train-segmenter run; Grad-CAM explains classifiers"),
    ("fused", "is a `tf-bus fuse` result"),
    ("not_an_image", "cannot be read as an image; pass PNG, JPEG or BMP files"),
    ("missing", "no such image file or folder"),
    ("target", "target must be `predicted` or one of benign, malignant, normal"),
])
def test_explain_refusals(case, message, run_64, tiny_runs, synthetic_release, tmp_path):
    image = synthetic_release / "benign" / "benign (1).png"
    run, images, target = run_64, [image], "predicted"
    if case == "segmenter":
        run = tiny_runs["segmenter"]
    elif case == "fused":
        run = tmp_path / "fused"
        shutil.copytree(run_64, run)
        (run / "fusion_model.json").write_text("{}")
    elif case == "not_an_image":
        images = [tmp_path / "notes.png"]
        images[0].write_text("not a PNG")
    elif case == "missing":
        images = [tmp_path / "absent.png"]
    else:
        target = "cyst"
    out = tmp_path / "maps"
    with pytest.raises(TfBusError, match=message):
        explain_images(run, images, out, target=target)
    assert not out.exists()  # refused before anything is written
