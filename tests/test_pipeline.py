"""tf.data loaders over the three layouts: shapes, ranges, pairing, augmentation, sharding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from tf_bus.config import AugmentConfig, ConfigError, LoaderConfig
from tf_bus.data.busi import TfBusError
from tf_bus.data.pipeline import (
    augment_pair,
    class_weights,
    classification_dataset,
    count_segmentation_examples,
    detect_layout,
    segmentation_dataset,
)

SMALL = dict(image_size=(48, 40), batch_size=4)


def _collect(ds):
    out = [list(map(np.asarray, b)) for b in ds]
    return [np.concatenate([b[k] for b in out]) for k in range(len(out[0]))]


CLS_SOURCES = ["prepared", "classification", "release"]


@pytest.mark.parametrize("source", CLS_SOURCES)
@pytest.mark.parametrize("channels,scale", [(3, "unit"), (1, "raw")])
def test_classification_loader(source, channels, scale, prepared, synthetic_release):
    data = {"prepared": prepared, "classification": prepared / "classification", "release": synthetic_release}[source]
    cfg = LoaderConfig(channels=channels, scale=scale, **SMALL)
    x, y, names = _collect(classification_dataset(data, "validation", cfg, include_names=True,
                                                  splits_file=prepared / "splits.json"))
    assert x.shape[1:] == (48, 40, channels) and x.dtype == np.float32
    assert x.min() >= 0 and x.max() <= (1.0 if scale == "unit" else 255.0) and x.max() > (0.5 if scale == "unit" else 100)
    assert y.dtype == np.int32 and set(y) <= {0, 1, 2}
    for label, name in zip(y, names):
        assert name.decode().startswith(("benign", "malignant", "normal")[label])


def test_release_and_layout_give_the_same_split(prepared, synthetic_release):
    cfg = LoaderConfig(**SMALL, shuffle=False)
    for split in ("train", "validation", "test"):
        _, _, a = _collect(segmentation_dataset(prepared, split, cfg, include_names=True, training=False))
        _, _, b = _collect(segmentation_dataset(synthetic_release, split, cfg, include_names=True, training=False))
        assert sorted(a) == sorted(b), split


SEG_SOURCES = ["prepared", "segmentation", "release"]


@pytest.mark.parametrize("source", SEG_SOURCES)
def test_segmentation_loader_masks_match_the_layout(source, prepared, synthetic_release):
    data = {"prepared": prepared, "segmentation": prepared / "segmentation", "release": synthetic_release}[source]
    cfg = LoaderConfig(**SMALL)
    x, m, names = _collect(segmentation_dataset(data, "test", cfg, include_names=True, training=False))
    ref_x, ref_m, ref_names = _collect(segmentation_dataset(prepared / "segmentation", "test", cfg,
                                                            include_names=True, training=False))
    order = np.argsort(names)
    ref = np.argsort(ref_names)
    np.testing.assert_array_equal(names[order], ref_names[ref])
    assert m.shape[1:] == (48, 40, 1) and set(np.unique(m)) <= {0.0, 1.0}
    np.testing.assert_array_equal(m[order], ref_m[ref])
    np.testing.assert_allclose(x[order], ref_x[ref], atol=1e-6)
    lesion = [n.decode().startswith(("benign", "malignant")) for n in names]
    assert all(m[i].sum() > 0 for i, les in enumerate(lesion) if les)
    assert all(m[i].sum() == 0 for i, les in enumerate(lesion) if not les)


@pytest.mark.parametrize("source", SEG_SOURCES)
def test_lesion_only_leaves_out_the_images_with_empty_masks(source, prepared, synthetic_release):
    data = {"prepared": prepared, "segmentation": prepared / "segmentation", "release": synthetic_release}[source]
    every = _collect(segmentation_dataset(data, "train", LoaderConfig(**SMALL), include_names=True, training=False,
                                          splits_file=prepared / "splits.json"))
    lesions = _collect(segmentation_dataset(data, "train", LoaderConfig(lesion_only=True, **SMALL), include_names=True,
                                            training=False, splits_file=prepared / "splits.json"))
    with_lesion = {n for n, m in zip(every[2], every[1]) if m.sum() > 0}
    assert 0 < len(with_lesion) < len(every[2]), "the synthetic train split holds normal images"
    assert set(lesions[2]) == with_lesion and all(m.sum() > 0 for m in lesions[1])
    assert {n.decode().split(" ")[0] for n in lesions[2]} == {"benign", "malignant"}
    assert count_segmentation_examples(data, "train", splits_file=prepared / "splits.json",
                                       lesion_only=True) == len(with_lesion)


@pytest.mark.parametrize("source", CLS_SOURCES)
def test_classification_loader_with_lesion_masks(source, prepared, synthetic_release):
    # The multi-task classifier's masks are the segmentation layout's, paired by name;
    # offline-balancing copies have none (known 0, an all-zero mask).
    data = {"prepared": prepared, "classification": prepared / "classification", "release": synthetic_release}[source]
    cfg = LoaderConfig(**SMALL, shuffle=False, augment=False)
    _, ref_m, ref_names = _collect(segmentation_dataset(prepared, "train", cfg, include_names=True, training=False))
    ref = dict(zip(ref_names, ref_m))
    batches = list(classification_dataset(data, "train", cfg, include_names=True, with_masks=True,
                                          splits_file=prepared / "splits.json"))
    labels = np.concatenate([np.asarray(b[1][0]) for b in batches])
    masks = np.concatenate([np.asarray(b[1][1]) for b in batches])
    known = np.concatenate([np.asarray(b[1][2]) for b in batches])
    names = np.concatenate([np.asarray(b[2]) for b in batches])
    assert masks.shape[1:] == (48, 40, 1) and known.dtype == np.float32
    copies = [b"__aug" in n for n in names]
    assert any(copies) == (source != "release")  # the release has no balancing copies
    for name, label, mask, k, copy in zip(names, labels, masks, known, copies):
        if copy:
            assert k == 0.0 and mask.sum() == 0, name
        else:
            assert k == 1.0, name
            np.testing.assert_array_equal(mask, ref[name])
            assert (mask.sum() > 0) == (label != 2), name


def test_lesion_masks_need_the_segmentation_layout(prepared, tmp_path):
    import shutil

    alone = tmp_path / "classification"
    shutil.copytree(prepared / "classification", alone)
    with pytest.raises(TfBusError, match=r"segmentation.*--mask-loss-weight 0"):
        classification_dataset(alone, "train", LoaderConfig(**SMALL), with_masks=True)
    classification_dataset(alone, "train", LoaderConfig(**SMALL))  # without masks it is fine


def test_augmentation_keeps_image_and_mask_aligned():
    # An image that *is* its mask: after the same geometry they must still agree.
    mask = np.zeros((64, 64, 1), np.float32)
    mask[20:44, 10:30] = 1.0
    aug = AugmentConfig(brightness=0.0, contrast=0.0, rotation_deg=15, zoom=0.15, translate=0.1)
    for k in range(8):
        img, m = augment_pair(tf.constant(mask), tf.constant(mask), tf.constant([k, 7]), aug)
        img, m = img.numpy(), m.numpy()
        assert set(np.unique(m)) <= {0.0, 1.0}, "mask stays binary"
        inter = np.logical_and(img > 0.5, m > 0.5).sum()
        union = np.logical_or(img > 0.5, m > 0.5).sum()
        assert inter / union > 0.95, k
    a = augment_pair(tf.constant(mask), None, tf.constant([3, 4]), aug)[0]
    b = augment_pair(tf.constant(mask), None, tf.constant([3, 4]), aug)[0]
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_training_stream_is_augmented_and_varies_by_epoch(prepared):
    cfg = LoaderConfig(**SMALL, deterministic=True, shuffle=False)
    ds = segmentation_dataset(prepared, "train", cfg, training=True)
    e1 = next(iter(ds))[0].numpy()
    e2 = next(iter(ds))[0].numpy()
    plain = next(iter(segmentation_dataset(prepared, "train", cfg, training=False)))[0].numpy()
    assert not np.allclose(e1, plain) and not np.allclose(e1, e2)


NO_CHANGE = AugmentConfig(horizontal_flip=False, rotation_deg=0, zoom=0, translate=0, brightness=0, contrast=0)


def _ramp(size=48):
    """A grey ramp with a bright square: every grey level from 0 to 1 and an edge."""
    image = np.tile(np.linspace(0.0, 1.0, size, dtype=np.float32), (size, 1))[..., None]
    image[12:30, 12:30] = 1.0
    return image


@pytest.mark.parametrize("field,value", [("gamma", 0.5), ("noise", 0.1), ("blur", 1.5)])
def test_intensity_augmentation_changes_the_image_only(field, value):
    image, mask = _ramp(), (_ramp() > 0.99).astype(np.float32)
    aug = dataclasses.replace(NO_CHANGE, **{field: value})
    outs = [augment_pair(tf.constant(image), tf.constant(mask), tf.constant([k, 3]), aug) for k in range(6)]
    changed = 0
    for out_image, out_mask in outs:
        np.testing.assert_array_equal(out_mask.numpy(), mask)  # geometry untouched: the mask is the same
        x = out_image.numpy()
        assert x.shape == image.shape and x.min() >= 0.0 and x.max() <= 1.0
        changed += not np.allclose(x, image, atol=1e-3)
    assert changed >= 4, "each image draws its own strength (from 0 up, so a few barely change)"
    again = augment_pair(tf.constant(image), tf.constant(mask), tf.constant([2, 3]), aug)[0]
    np.testing.assert_array_equal(again.numpy(), outs[2][0].numpy())  # the seed decides


def test_gamma_keeps_the_order_of_grey_levels_and_the_ends():
    image = _ramp()
    for k in range(4):
        x = augment_pair(tf.constant(image), None, tf.constant([k, 9]), dataclasses.replace(NO_CHANGE, gamma=1.0))[0]
        row = x.numpy()[40, :, 0]
        assert np.all(np.diff(row) >= 0) and row[0] == 0.0 and abs(row[-1] - 1.0) < 1e-6
        g = np.log(row[24]) / np.log(image[40, 24, 0])  # the exponent drawn
        assert 0.5 - 1e-4 <= g <= 2.0 + 1e-4, g


def test_blur_spreads_an_edge_and_keeps_the_mean():
    image = np.zeros((32, 32, 1), np.float32)
    image[:, 16:] = 1.0
    x = augment_pair(tf.constant(image), None, tf.constant([1, 1]), dataclasses.replace(NO_CHANGE, blur=3.0))[0].numpy()
    assert abs(x.mean() - image.mean()) < 1e-3  # a normalised kernel with mirrored borders
    assert 0.0 < x[10, 15, 0] < 0.5 < x[10, 16, 0] < 1.0  # the edge is now a ramp
    np.testing.assert_allclose(x[:, :8], 0.0, atol=1e-3)  # far from it, nothing moves
    tiny = augment_pair(tf.zeros((4, 4, 1)), None, tf.constant([1, 1]), dataclasses.replace(NO_CHANGE, blur=7.0))[0]
    assert tiny.shape == (4, 4, 1)  # a kernel wider than the image is cut to fit


@pytest.mark.parametrize("trainer", ["segmentation", "classification"])
def test_the_trainers_augmentation_ranges_reach_the_loader(trainer, prepared):
    import importlib

    from tf_bus.config import ClassifierConfig, SegmenterConfig

    module = importlib.import_module(f"tf_bus.training.{trainer}")
    cls = SegmenterConfig if trainer == "segmentation" else ClassifierConfig
    load = segmentation_dataset if trainer == "segmentation" else classification_dataset

    def first_batch(augmentation, augment):
        cfg = cls(image_size=(64, 64), batch_size=4, augmentation=augmentation)  # a size the default U-Net takes
        loader = module.loader_config(cfg, augment=augment, shuffle=False, deterministic=True)
        assert loader.augmentation == augmentation
        return next(iter(load(prepared, "train", loader, training=True)))[0].numpy()

    plain = first_batch(NO_CHANGE, augment=False)
    np.testing.assert_array_equal(first_batch(NO_CHANGE, augment=True), plain)  # zero ranges: nothing changes
    assert not np.allclose(first_batch(AugmentConfig(horizontal_flip=False, brightness=0.3), augment=True), plain)


@pytest.mark.parametrize("load", [segmentation_dataset, classification_dataset])
@pytest.mark.parametrize("autotune", [False, True])
def test_autotune_option_reaches_the_dataset_and_changes_no_element(load, autotune, prepared):
    cfg = LoaderConfig(**SMALL, deterministic=True, shuffle=False, autotune=autotune)
    ds = load(prepared, "train", cfg, training=True, include_names=True)
    assert ds.options().autotune.enabled is autotune
    other = load(prepared, "train", LoaderConfig(**SMALL, deterministic=True, shuffle=False, autotune=not autotune),
                 training=True, include_names=True)
    for a, b in zip(_collect(ds), _collect(other)):  # the same elements, augmentation included
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("trainer", ["segmentation", "classification"])
def test_the_trainers_load_without_tf_data_autotuning(trainer):
    import importlib

    from tf_bus.config import ClassifierConfig, SegmenterConfig

    module = importlib.import_module(f"tf_bus.training.{trainer}")
    cls = SegmenterConfig if trainer == "segmentation" else ClassifierConfig
    assert module.loader_config(cls()).autotune is False


def test_deterministic_order_with_a_seed(prepared):
    cfg = LoaderConfig(**SMALL, deterministic=True, seed=11)
    a = _collect(classification_dataset(prepared, "train", cfg, include_names=True))[2]
    b = _collect(classification_dataset(prepared, "train", cfg, include_names=True))[2]
    np.testing.assert_array_equal(a, b)


def test_input_context_shards_and_divides_the_batch(prepared):
    cfg = LoaderConfig(image_size=(32, 32), batch_size=4, shuffle=False)
    seen = []
    for pid in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pid, num_replicas_in_sync=2)
        batches = list(segmentation_dataset(prepared, "train", cfg, input_context=ctx, include_names=True))
        assert max(b[0].shape[0] for b in batches) == 2, "per-replica batch = global / replicas"
        seen.append({n for b in batches for n in b[2].numpy()})
    everything = {n for b in segmentation_dataset(prepared, "train", cfg, include_names=True) for n in b[2].numpy()}
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == everything


def test_balanced_sampling_and_class_weights(prepared):
    cfg = LoaderConfig(**SMALL)
    ys = np.concatenate([y.numpy() for _, y in classification_dataset(prepared, "train", cfg, balanced=True,
                                                                      include_augmented=False).take(60)])
    counts = np.bincount(ys, minlength=3) / len(ys)
    assert np.all(np.abs(counts - 1 / 3) < 0.12), counts
    w = class_weights(prepared)
    assert w[2] > w[1] > w[0], "rarer classes weigh more (normal < malignant < benign in count)"


def test_pad_resize_keeps_aspect(prepared):
    cfg = LoaderConfig(image_size=(64, 64), batch_size=2, resize="pad")
    x, m = next(iter(segmentation_dataset(prepared, "test", cfg, training=False)))
    # Synthetic images are not square: either the top row or the left column is padding.
    x = x.numpy()
    for img in x:
        assert img[0].max() == 0.0 or img[:, 0].max() == 0.0
    stretched = next(iter(segmentation_dataset(prepared, "test", LoaderConfig(image_size=(64, 64), batch_size=2),
                                               training=False)))[0].numpy()
    assert all(img[0].max() > 0 and img[:, 0].max() > 0 for img in stretched)


ILL_LOADERS = [
    (lambda p, r: classification_dataset(p / "segmentation", "train"), "no class labels"),
    (lambda p, r: segmentation_dataset(p / "classification", "train"), "has no masks"),
    (lambda p, r: segmentation_dataset(p, "training"), "Unknown split"),
    (lambda p, r: segmentation_dataset(p / "nope", "train"), "no such directory"),
    (lambda p, r: detect_layout(p / "segmentation" / "train_images", "segmentation"), "not a BUSI layout"),
]


@pytest.mark.parametrize("call,message", ILL_LOADERS)
def test_loader_errors_are_clear(call, message, prepared, synthetic_release):
    with pytest.raises(TfBusError, match=message):
        call(prepared, synthetic_release)


@pytest.mark.parametrize("kwargs", [dict(channels=2), dict(image_size=(4, 4)), dict(scale="x"), dict(batch_size=0)])
def test_bad_loader_config(kwargs):
    with pytest.raises(ConfigError, match="Received"):
        LoaderConfig(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(zoom=1.0), r"`zoom` \(flag --zoom\) must be within \[0, 1\)"),
    (dict(rotation_deg=-1), r"`rotation_deg` \(flag --rotation-deg\) must be within \[0, 180\)"),
    (dict(translate=0.5), r"`translate` .* \[0, 0.5\)"),
    (dict(brightness=2), r"`brightness` .* Received: brightness=2.0"),
    (dict(contrast=1.5), r"`contrast` .* Received: contrast=1.5"),
    (dict(gamma=-0.1), r"`gamma` \(flag --gamma\) must be within \[0, 4\)"),
    (dict(noise=1.0), r"`noise` .* Received: noise=1.0"),
    (dict(blur=8), r"`blur` \(flag --blur\) must be within \[0, 8\)"),
])
def test_bad_augmentation_ranges(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AugmentConfig(**kwargs)
