"""tf.data loaders for the three BUSI layouts (stage 4 of the pipeline).

``classification_dataset`` and ``segmentation_dataset`` accept any of:

* a prepared output root (``OUT`` of ``tf-bus prepare``: holds ``classification/`` and
  ``segmentation/``),
* the classification layout (``OUT/classification``: ``{train,validation,test}/<class>/``),
* the segmentation layout (``OUT/segmentation``: ``train_images/train`` ... ``*_masks``),
* the raw release (``Dataset_BUSI_with_GT`` or its parent): the split comes from a
  ``splits.json`` if one is given, else it is computed (deterministic, leak-free).

Elements are ``(image, label)`` for classification, with ``image`` float32
``(H, W, C)`` and ``label`` int32 (benign=0, malignant=1, normal=2), and
``(image, mask)`` for segmentation, with ``mask`` float32 ``(H, W, 1)`` in {0, 1};
batched. With ``include_names`` a third item is the case's file stem (tf.string).

Order of the graph: file list -> shard (InputContext) -> parallel decode + resize ->
cache (uint8) -> shuffle -> paired augmentation -> scale -> batch -> prefetch.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from pathlib import Path

import tensorflow as tf

from tf_bus.config import (
    CLASS_NAMES,
    IMAGE_EXTENSIONS,
    SEGMENTATION_DIRS,
    SPLITS,
    AugmentConfig,
    LoaderConfig,
    SplitConfig,
)
from tf_bus.data.busi import BusiDataError, TfBusError, find_release_root, read_release, scan_release
from tf_bus.data.layouts import AUG_MARK, layout_stem
from tf_bus.data.split import check_plan_matches, load_splits, make_split

AUTOTUNE = tf.data.AUTOTUNE
_MASK_SEP = "\n"  # several mask paths of one case travel as one joined string


# ----------------------------------------------------------------------------- listing

def detect_layout(path: str | os.PathLike, task: str) -> tuple[str, Path]:
    """Finds which layout ``path`` is.

    Args:
        path: a prepared root, a classification or segmentation layout, or a release.
        task: ``"classification"`` or ``"segmentation"`` (picks the sub-layout of a
            prepared root).

    Returns:
        ``(kind, root)`` with kind in ``classification``, ``segmentation``, ``release``.
    """
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise TfBusError(f"{p}: no such directory. Pass a prepared folder or a BUSI release.")
    if (p / task).is_dir() and task in ("classification", "segmentation"):
        return task, p / task
    if all((p / s).is_dir() for s in SPLITS):
        return "classification", p
    if (p / "train_images").is_dir() or (p / "test_images").is_dir():
        return "segmentation", p
    try:
        return "release", find_release_root(p)
    except TfBusError:
        raise TfBusError(
            f"{p}: not a BUSI layout. Expected a `tf-bus prepare` output, "
            "classification/ (train/validation/test/<class>/), segmentation/ "
            "(train_images/train, ...), or Dataset_BUSI_with_GT/."
        ) from None


def _check_split(split: str) -> None:
    if split not in SPLITS + ("all",):
        raise TfBusError(f"Unknown split {split!r}. Use one of: {', '.join(SPLITS)}, all.")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def list_classification(root: Path, split: str, *, include_augmented: bool = True) -> tuple[list[str], list[int]]:
    """Image paths and labels of one split of the classification layout."""
    _check_split(split)
    paths, labels = [], []
    for s in SPLITS if split == "all" else (split,):
        for idx, label in enumerate(CLASS_NAMES):
            folder = root / s / label
            if not folder.is_dir():
                raise TfBusError(f"{folder}: missing. Re-run `tf-bus prepare` to rebuild the layout.")
            for p in _images_in(folder):
                if include_augmented or AUG_MARK not in p.stem:
                    paths.append(str(p))
                    labels.append(idx)
    return paths, labels


def classification_masks(root: Path, split: str, paths: list[str]) -> tuple[list[str], list[int]]:
    """Lesion mask paths for images of the classification layout at ``root``, read from the
    segmentation layout next to it (``tf-bus prepare`` writes both). Offline-balancing
    copies have no mask: their path is empty and their "known" flag 0.

    Raises:
        TfBusError: no segmentation layout beside ``root``, or an original image without mask.
    """
    seg = root.parent / "segmentation"
    if not seg.is_dir():
        raise TfBusError(
            f"{root}: lesion masks are read from the segmentation layout beside it, and {seg} does not exist. "
            "Pass the `tf-bus prepare` output folder (or the raw release), or train without the lesion head "
            "(--mask-loss-weight 0).")
    masks, known = [], []
    splits = SPLITS if split == "all" else (split,)
    for path in paths:
        p = Path(path)
        if AUG_MARK in p.stem:
            masks.append("")
            known.append(0)
            continue
        s = p.parent.parent.name if p.parent.parent.name in splits else split
        mask = seg / SEGMENTATION_DIRS[s][1] / f"{p.stem}_mask.png"
        if not mask.is_file():
            raise TfBusError(f"{p}: no lesion mask {mask}. Re-run `tf-bus prepare`, or pass --mask-loss-weight 0.")
        masks.append(str(mask))
        known.append(1)
    return masks, known


def list_segmentation(root: Path, split: str) -> tuple[list[str], list[str]]:
    """Image and mask paths of one split of the segmentation layout, paired by name."""
    _check_split(split)
    images, masks = [], []
    for s in SPLITS if split == "all" else (split,):
        img_dir, mask_dir = (root / d for d in SEGMENTATION_DIRS[s])
        for d in (img_dir, mask_dir):
            if not d.is_dir():
                raise TfBusError(f"{d}: missing. Re-run `tf-bus prepare` to rebuild the layout.")
        by_stem = {p.stem: p for p in _images_in(mask_dir)}
        for img in _images_in(img_dir):
            mask = by_stem.pop(f"{img.stem}_mask", None)
            if mask is None:
                raise TfBusError(f"{img}: no mask {img.stem}_mask.png in {mask_dir}. Re-run `tf-bus prepare`.")
            images.append(str(img))
            masks.append(str(mask))
        if by_stem:
            extra = sorted(by_stem)[0]
            raise TfBusError(f"{mask_dir / extra}: mask without image in {img_dir}. Re-run `tf-bus prepare`.")
    return images, masks


def list_release(
    root: Path,
    split: str,
    *,
    splits_file: str | os.PathLike | None = None,
    split_config: SplitConfig | None = None,
) -> tuple[list[str], list[str], list[int]]:
    """Image paths, joined mask paths and labels of one split of the raw release.

    The split is read from ``splits_file`` when given; otherwise it is computed exactly
    as ``tf-bus prepare`` computes it (same defaults give the same split).
    """
    _check_split(split)
    scan = scan_release(root)
    if scan.problems:
        raise BusiDataError(scan.problems)
    if split == "all":
        chosen = scan.cases
    else:
        if splits_file is not None:  # file names suffice: no pixel is read
            plan = load_splits(splits_file)
            check_plan_matches(plan, [c.case_id for c in scan.cases], str(splits_file))
        else:  # duplicate grouping needs every image (about 3 s for BUSI)
            plan = make_split(read_release(root).infos, split_config)
        chosen = [c for c in scan.cases if plan.assignment[c.case_id] == split]
    return (
        [c.image_path for c in chosen],
        [_MASK_SEP.join(c.mask_paths) for c in chosen],
        [c.label_index for c in chosen],
    )


def _stem_of(path: str) -> str:
    return Path(path).stem


# ----------------------------------------------------------------------------- decoding

def _decode(contents: tf.Tensor, channels: int) -> tf.Tensor:
    img = tf.io.decode_image(contents, channels=channels, dtype=tf.uint8, expand_animations=False)
    img.set_shape([None, None, channels])
    return img


def _binarise(mask_u8: tf.Tensor) -> tf.Tensor:
    """{0, 1} uint8: foreground where the grey level exceeds half the mask's maximum."""
    peak = tf.reduce_max(mask_u8)
    return tf.cast(tf.logical_and(mask_u8 > peak // 2, peak > 0), tf.uint8)


def _read_mask(joined_paths: tf.Tensor) -> tf.Tensor:
    paths = tf.strings.split(joined_paths, _MASK_SEP)
    first = _binarise(_decode(tf.io.read_file(paths[0]), 1))

    def body(i, acc):
        return i + 1, tf.maximum(acc, _binarise(_decode(tf.io.read_file(paths[i]), 1)))

    _, union = tf.while_loop(lambda i, _: i < tf.size(paths), body, (tf.constant(1), first),
                             shape_invariants=(tf.TensorShape([]), tf.TensorShape([None, None, 1])))
    return union


def _resize_image(x: tf.Tensor, config: LoaderConfig) -> tf.Tensor:
    """Antialiased resize of a uint8 image. Grey images stored as RGB (almost all of
    BUSI) are resized on one channel and replicated: the same pixels, about twice
    as fast (the antialiased resize is the costliest op of the cold epoch)."""
    if config.channels == 1:
        return _resize(x, config, "bilinear")
    grey = tf.reduce_all(tf.equal(x[..., 0], x[..., 1])) & tf.reduce_all(tf.equal(x[..., 1], x[..., 2]))
    return tf.cond(grey,
                   lambda: tf.tile(_resize(x[..., :1], config, "bilinear"), [1, 1, 3]),
                   lambda: _resize(x, config, "bilinear"))


def _resize(x: tf.Tensor, config: LoaderConfig, method: str) -> tf.Tensor:
    h, w = config.image_size
    antialias = method == "bilinear"
    if config.resize == "pad":
        out = tf.image.resize_with_pad(tf.cast(x, tf.float32), h, w, method=method, antialias=antialias)
    else:
        out = tf.image.resize(tf.cast(x, tf.float32), (h, w), method=method, antialias=antialias)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


# ----------------------------------------------------------------------------- augmentation

def _affine_matrix(seed: tf.Tensor, aug: AugmentConfig, h: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
    """A (1, 8) projective transform (output -> input) for rotate/zoom/shift about the centre."""
    u = tf.random.stateless_uniform([4], seed=seed, minval=-1.0, maxval=1.0)
    theta = u[0] * aug.rotation_deg * math.pi / 180.0
    zoom = 1.0 + u[1] * aug.zoom
    tx, ty = u[2] * aug.translate * w, u[3] * aug.translate * h
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    c, s = tf.cos(theta) / zoom, tf.sin(theta) / zoom
    a0, a1, b0, b1 = c, s, -s, c
    a2 = cx - a0 * (cx + tx) - a1 * (cy + ty)
    b2 = cy - b0 * (cx + tx) - b1 * (cy + ty)
    return tf.reshape(tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0]), [1, 8])


def _transform(x: tf.Tensor, matrix: tf.Tensor, interpolation: str) -> tf.Tensor:
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None], transforms=matrix, output_shape=tf.shape(x)[:2],
        interpolation=interpolation, fill_mode="CONSTANT", fill_value=0.0)
    return out[0]


def augment_pair(
    image: tf.Tensor,
    mask: tf.Tensor | None,
    seed: tf.Tensor,
    aug: AugmentConfig,
) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Random paired augmentation with a stateless ``seed`` (shape (2,), int).

    Args:
        image: float32 (H, W, C) in [0, 1].
        mask: float32 (H, W, 1) in {0, 1}, or None (classification).
        seed: the element's seed; the same seed gives the same augmentation.
        aug: the ranges.

    Returns:
        ``(image, mask)``: the same geometry applied to both (bilinear for the image,
        nearest for the mask, so the mask stays binary); brightness, contrast, blur,
        noise and gamma on the image only.
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=5)
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    if aug.horizontal_flip:
        flip = tf.random.stateless_uniform([], seed=seeds[0]) < 0.5
        image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
        if mask is not None:
            mask = tf.cond(flip, lambda: tf.reverse(mask, [1]), lambda: mask)
    if aug.vertical_flip:
        flip = tf.random.stateless_uniform([], seed=seeds[1]) < 0.5
        image = tf.cond(flip, lambda: tf.reverse(image, [0]), lambda: image)
        if mask is not None:
            mask = tf.cond(flip, lambda: tf.reverse(mask, [0]), lambda: mask)
    if aug.rotation_deg or aug.zoom or aug.translate:
        m = _affine_matrix(seeds[2], aug, h, w)
        image = _transform(image, m, "BILINEAR")
        if mask is not None:
            mask = _transform(mask, m, "NEAREST")
    if aug.brightness or aug.contrast:
        u = tf.random.stateless_uniform([2], seed=seeds[3], minval=-1.0, maxval=1.0)
        mean = tf.reduce_mean(image)
        image = (image - mean) * (1.0 + u[0] * aug.contrast) + mean + u[1] * aug.brightness
        image = tf.clip_by_value(image, 0.0, 1.0)
    if aug.gamma or aug.noise or aug.blur:
        image = _intensity(image, seeds[4], aug)
    return image, mask


def _intensity(image: tf.Tensor, seed: tf.Tensor, aug: AugmentConfig) -> tf.Tensor:
    """nnU-Net's intensity augmentations on a [0, 1] image: blur, noise, gamma (each at
    a strength drawn per image from zero to its range's end)."""
    u = tf.random.stateless_uniform([3], seed=seed)
    if aug.blur:
        sides = [d for d in image.shape[:2] if d is not None]
        radius = min([math.ceil(3.0 * aug.blur)] + [d - 1 for d in sides])  # REFLECT pads less than a side
        image = _gaussian_blur(image, u[0] * aug.blur, radius=radius)
    if aug.noise:
        noise_seed = tf.random.experimental.stateless_fold_in(seed, 1)
        image = image + tf.random.stateless_normal(tf.shape(image), seed=noise_seed) * (u[1] * aug.noise)
        image = tf.clip_by_value(image, 0.0, 1.0)
    if aug.gamma:
        log_range = math.log1p(aug.gamma)
        g = tf.exp((2.0 * u[2] - 1.0) * log_range)
        image = tf.pow(tf.maximum(image, 0.0), g)
    return image


def _gaussian_blur(image: tf.Tensor, sigma: tf.Tensor, radius: int) -> tf.Tensor:
    """Separable Gaussian blur of an (H, W, C) image; ``sigma`` (pixels) may be a tensor,
    ``radius`` (the kernel's half-width) is static. Sigma near 0 leaves the image as is."""
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(x / tf.maximum(sigma, 1e-3)))
    kernel = kernel / tf.reduce_sum(kernel)
    channels = tf.shape(image)[-1]
    rows = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
    cols = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
    padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    out = tf.nn.depthwise_conv2d(padded, rows, strides=[1, 1, 1, 1], padding="VALID")
    out = tf.nn.depthwise_conv2d(out, cols, strides=[1, 1, 1, 1], padding="VALID")
    return out[0]


# ----------------------------------------------------------------------------- datasets

def _finish(
    ds: tf.data.Dataset,
    config: LoaderConfig,
    training: bool,
    input_context: tf.distribute.InputContext | None,
    has_mask: bool,
    include_names: bool,
    num_examples: int,
) -> tf.data.Dataset:
    """Everything after decoding: cache, shuffle, augment, scale, batch, prefetch."""
    if config.cache:
        ds = ds.cache()
    shuffle = training if config.shuffle is None else config.shuffle
    augment = training if config.augment is None else config.augment
    if shuffle and num_examples > 1:
        ds = ds.shuffle(min(config.shuffle_buffer, num_examples), seed=config.seed,
                        reshuffle_each_iteration=True)
    seeds = tf.data.Dataset.random(seed=config.seed, rerandomize_each_iteration=True).batch(2)
    ds = tf.data.Dataset.zip((ds, seeds))
    aug = config.augmentation
    factor = 255.0 if config.scale == "raw" else 1.0

    def post(elem, seed):
        image, target, name = elem
        image = tf.cast(image, tf.float32) / 255.0
        lesion = isinstance(target, tuple)  # classification with masks: (label, mask, known)
        if has_mask:
            mask = tf.cast(target, tf.float32)
        elif lesion:
            label, mask, known = target
            mask = tf.cast(mask, tf.float32)
        else:
            mask = None
        if augment:
            image, mask = augment_pair(image, mask, seed, aug)
        image = image * factor
        out_target = mask if has_mask else (label, mask, tf.cast(known, tf.float32)) if lesion else target
        return (image, out_target, name) if include_names else (image, out_target)

    ds = ds.map(post, num_parallel_calls=AUTOTUNE, deterministic=config.deterministic or None)
    batch = config.batch_size
    if input_context is not None:
        batch = input_context.get_per_replica_batch_size(config.batch_size)
    ds = ds.batch(batch, drop_remainder=config.drop_remainder)
    options = tf.data.Options()
    options.deterministic = config.deterministic
    options.autotune.enabled = config.autotune  # see LoaderConfig.autotune
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF if input_context is not None
        else tf.data.experimental.AutoShardPolicy.AUTO)
    return ds.with_options(options).prefetch(AUTOTUNE)


def _is_training(split: str, training: bool | None) -> bool:
    return split == "train" if training is None else training


def classification_dataset(
    data: str | os.PathLike,
    split: str,
    config: LoaderConfig | None = None,
    *,
    training: bool | None = None,
    input_context: tf.distribute.InputContext | None = None,
    splits_file: str | os.PathLike | None = None,
    balanced: bool = False,
    include_augmented: bool = True,
    include_names: bool = False,
    with_masks: bool = False,
) -> tf.data.Dataset:
    """A batched, prefetched dataset of ``(image, label)`` for the classifier.

    Args:
        data: prepared root, classification layout, or the raw release (a
            segmentation layout alone has no class labels and is refused).
        split: ``train``, ``validation``, ``test`` or ``all``.
        config: loader settings (size, channels, scale, batch, augmentation ...).
        training: shuffle and augment (default: only for ``train``).
        input_context: shards files across input pipelines and divides the global
            batch size by the number of replicas.
        splits_file: the ``splits.json`` to use with a raw release.
        balanced: sample the classes equally (an infinite dataset: pass
            ``steps_per_epoch`` to ``fit``); an alternative to the offline balancing
            of ``prepare`` and to class weights.
        include_augmented: keep the offline-balancing copies of a prepared layout.
        include_names: add the file stem as a third element.
        with_masks: the target is ``(label, mask, known)``: the lesion mask (B, H, W, 1)
            in {0, 1}, augmented with the image, and ``known`` (B,) 1.0 where the mask
            exists (0.0 for offline-balancing copies, whose mask is all zero). A
            classification layout reads masks from the segmentation layout beside it.

    Returns:
        ``tf.data.Dataset`` of ``(image (B, H, W, C) float32, label (B,) int32)``.
    """
    config = config or LoaderConfig()
    kind, root = detect_layout(data, "classification")
    if kind == "segmentation":
        raise TfBusError(f"{root}: a segmentation layout has no class labels. Pass the classification layout or the release.")
    if kind == "classification":
        paths, labels = list_classification(root, split, include_augmented=include_augmented)
    else:
        paths, masks, labels = list_release(root, split, splits_file=splits_file)
    if not paths:
        raise TfBusError(f"{root}: split {split!r} holds no images.")
    names = [_stem_of(p) if kind == "classification" else layout_stem(f"{CLASS_NAMES[l]}/{_stem_of(p)}")
             for p, l in zip(paths, labels)]
    if with_masks:
        masks, known = classification_masks(root, split, paths) if kind == "classification" else (masks, [1] * len(paths))
    training = _is_training(split, training)

    def files(idx):
        sel = [i for i, l in enumerate(labels) if idx is None or l == idx]
        cols = (tf.constant([paths[i] for i in sel]), tf.constant([labels[i] for i in sel], tf.int32),
                tf.constant([names[i] for i in sel]))
        if with_masks:
            cols += (tf.constant([masks[i] for i in sel]), tf.constant([known[i] for i in sel], tf.int32))
        ds = tf.data.Dataset.from_tensor_slices(cols)
        if input_context is not None:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        return ds

    def load(path, label, name, mask_paths=None, mask_known=None):
        image = _resize_image(_decode(tf.io.read_file(path), config.channels), config)
        if not with_masks:
            return image, label, name
        h, w = config.image_size
        mask = tf.cond(mask_known > 0, lambda: _resize(_read_mask(mask_paths), config, "nearest"),
                       lambda: tf.zeros((h, w, 1), tf.uint8))
        return image, (label, mask, mask_known), name

    if balanced:
        per_class = []
        for idx in range(len(CLASS_NAMES)):
            if idx not in labels:
                continue
            ds = files(idx).map(load, num_parallel_calls=AUTOTUNE)
            ds = (ds.cache() if config.cache else ds).repeat()
            per_class.append(ds)
        ds = tf.data.Dataset.sample_from_datasets(per_class, seed=config.seed)
        cfg = dataclasses.replace(config, cache=False)  # each class stream is cached above
        return _finish(ds, cfg, training, input_context, False, include_names, config.shuffle_buffer)
    ds = files(None).map(load, num_parallel_calls=AUTOTUNE, deterministic=config.deterministic or None)
    return _finish(ds, config, training, input_context, False, include_names, len(paths))


def segmentation_dataset(
    data: str | os.PathLike,
    split: str,
    config: LoaderConfig | None = None,
    *,
    training: bool | None = None,
    input_context: tf.distribute.InputContext | None = None,
    splits_file: str | os.PathLike | None = None,
    include_names: bool = False,
) -> tf.data.Dataset:
    """A batched, prefetched dataset of ``(image, mask)`` for the U-Net.

    Args:
        data: prepared root, segmentation layout, or the raw release (all masks of a
            case are united on the fly).
        split: ``train``, ``validation``, ``test`` or ``all``.
        config, training, input_context, splits_file, include_names: as in
            ``classification_dataset``.

    Returns:
        ``tf.data.Dataset`` of ``(image (B, H, W, C) float32, mask (B, H, W, 1)
        float32 in {0, 1})``.
    """
    config = config or LoaderConfig()
    root, images, masks, names = segmentation_cases(data, split, splits_file=splits_file,
                                                    lesion_only=config.lesion_only)
    if not images:
        raise TfBusError(f"{root}: split {split!r} holds no images"
                         + (" with a lesion (lesion_only)." if config.lesion_only else "."))
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(images), tf.constant(masks), tf.constant(names)))
    if input_context is not None:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)

    def load(path, mask_paths, name):
        image = _resize_image(_decode(tf.io.read_file(path), config.channels), config)
        mask = _resize(_read_mask(mask_paths), config, "nearest")
        return image, mask, name

    ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=config.deterministic or None)
    return _finish(ds, config, _is_training(split, training), input_context, True, include_names, len(images))


def segmentation_cases(
    data: str | os.PathLike, split: str, *, splits_file=None, lesion_only: bool = False,
) -> tuple[Path, list[str], list[str], list[str]]:
    """``(root, image paths, joined mask paths, names)`` of one split of a segmentation
    layout or a raw release; ``lesion_only`` keeps the cases whose (united) mask is not
    empty, reading every mask once (about a second for BUSI)."""
    kind, root = detect_layout(data, "segmentation")
    if kind == "classification":
        raise TfBusError(f"{root}: a classification layout has no masks. Pass the segmentation layout or the release.")
    if kind == "segmentation":
        images, masks = list_segmentation(root, split)
        names = [_stem_of(p) for p in images]
    else:
        images, masks, labels = list_release(root, split, splits_file=splits_file)
        names = [layout_stem(f"{CLASS_NAMES[l]}/{_stem_of(p)}") for p, l in zip(images, labels)]
    if lesion_only:
        from tf_bus.data.busi import load_mask

        keep = [i for i, m in enumerate(masks) if load_mask(tuple(m.split(_MASK_SEP))).any()]
        images, masks, names = ([xs[i] for i in keep] for xs in (images, masks, names))
    return root, images, masks, names


def count_segmentation_examples(data: str | os.PathLike, split: str, *, splits_file=None,
                                lesion_only: bool = False) -> int:
    """Number of (image, mask) pairs ``segmentation_dataset`` yields for ``split``."""
    return len(segmentation_cases(data, split, splits_file=splits_file, lesion_only=lesion_only)[1])


def class_weights(data: str | os.PathLike, split: str = "train", *, splits_file=None) -> dict[int, float]:
    """Inverse-frequency class weights for ``model.fit(class_weight=...)``.

    Counts only original images (offline-balancing copies excluded), so the weights
    describe the real class imbalance: ``n / (num_classes * count_c)``.
    """
    kind, root = detect_layout(data, "classification")
    if kind == "classification":
        _, labels = list_classification(root, split, include_augmented=False)
    elif kind == "release":
        _, _, labels = list_release(root, split, splits_file=splits_file)
    else:
        raise TfBusError(f"{root}: a segmentation layout has no class labels.")
    counts = collections.Counter(labels)
    n = len(labels)
    return {i: n / (len(counts) * counts[i]) for i in sorted(counts)}



def decode_image(contents: tf.Tensor, channels: int) -> tf.Tensor:
    """Encoded PNG/JPEG/BMP/GIF bytes -> uint8 (H, W, channels), as the loaders decode."""
    return _decode(contents, channels)


def resize_image(image_u8: tf.Tensor, channels: int, image_size: tuple[int, int]) -> tf.Tensor:
    """uint8 (H, W, channels) -> uint8 at ``image_size``, exactly as the loaders resize
    (the exported models' serving signatures use this and ``decode_image``)."""
    return _resize_image(image_u8, LoaderConfig(image_size=image_size, channels=channels))
