"""Lesion descriptors from a segmenter's mask (after segmentation, stage 7a).

What a radiologist reads off a breast lesion (BI-RADS ultrasound lexicon: shape,
orientation, margin, echo pattern, posterior features), measured on the lesion that the
U-Net marks: the largest connected component of its thresholded probability map, holes
filled. With the U-Net's confidence, they describe an image in a few numbers that
``tf_bus.fusion`` combines with the ResNet's class probabilities.

Every descriptor is a float; ``lesion_descriptors`` returns them in ``DESCRIPTOR_NAMES``
order. Distances are relative to the image height, so the descriptors do not depend on an
image's resolution. An empty mask (no pixel at the threshold) has every shape and echo
descriptor 0 and ``components`` 0; the probability descriptors are defined either way.
"""

from __future__ import annotations

import numpy as np

#: name -> what it measures (README, "Lesion-aware classification").
DESCRIPTORS: dict[str, str] = {
    "area": "lesion area / image area",
    "height_over_width": "bounding-box height / width (taller than wide: a BI-RADS sign of malignancy)",
    "circularity": "4 pi area / perimeter^2 (about 1 for a disc, lower for lobulated or spiculated outlines)",
    "solidity": "area / convex hull area (below 1 for irregular, angular outlines)",
    "margin_irregularity": "perimeter / sqrt(area) (about 3.5 for a disc, higher for ragged outlines)",
    "mean_inside": "mean grey level inside the lesion (0..1)",
    "mean_around": "mean grey level of a ring around it (2% of the image height wide)",
    "contrast": "mean_inside - mean_around (hypo-echoic lesions are negative)",
    "heterogeneity": "standard deviation of the grey levels inside",
    "posterior": "mean grey level below the lesion (8% of the height) - mean_inside: enhancement > 0, "
                 "shadowing < 0",
    "depth": "lesion centroid row / image height",
    "components": "connected components of the thresholded map",
    "mask_fraction": "thresholded pixels / image pixels (every component)",
    "max_probability": "highest lesion probability in the image",
    "top_probability": "mean of the highest 0.2% of the lesion probabilities",
}
DESCRIPTOR_NAMES: tuple[str, ...] = tuple(DESCRIPTORS)

RING = 0.02  # of the image height
BELOW = 0.08
TOP_SHARE = 0.002


def _convex_hull_area(rows: np.ndarray, cols: np.ndarray) -> float:
    from scipy.spatial import ConvexHull

    # Pixel corners, not centres: even a one-pixel-wide lesion has a hull of positive area.
    points = np.concatenate([np.c_[rows + dr, cols + dc] for dr in (-0.5, 0.5) for dc in (-0.5, 0.5)])
    return float(ConvexHull(points).volume)


def _perimeter(mask: np.ndarray) -> float:
    """The outline's length in pixels, estimated from the pixel edges between the mask and
    the rest (the image border counts as outside) times pi/4: the mean length of a curve's
    city-block path over its orientations (Cauchy-Crofton), so a disc of radius r measures
    about 2 pi r. Axis-aligned straight edges come out pi/4 of their length."""
    padded = np.pad(mask, 1).astype(np.int8)
    edges = np.abs(np.diff(padded, axis=0)).sum() + np.abs(np.diff(padded, axis=1)).sum()
    return float(edges) * np.pi / 4


def lesion_descriptors(image: np.ndarray, probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """The ``DESCRIPTOR_NAMES`` of one image.

    Args:
        image: (H, W) grey levels in [0, 1] (or (H, W, C): averaged over channels).
        probabilities: (H, W) lesion probabilities at the image's resolution.
        threshold: probabilities at or above it are lesion.

    Returns:
        float64 array of ``len(DESCRIPTOR_NAMES)`` values.
    """
    from scipy import ndimage

    image = np.asarray(image, np.float64)
    if image.ndim == 3:
        image = image.mean(axis=-1)
    prob = np.asarray(probabilities, np.float64)
    if image.shape != prob.shape:
        raise ValueError(f"image {image.shape} and probabilities {prob.shape} differ in size; resize the "
                         "probabilities to the image first.")
    h, w = prob.shape
    flat = prob.ravel()
    k = max(1, int(round(TOP_SHARE * flat.size)))
    top = np.partition(flat, flat.size - k)[-k:].mean()  # the k highest, without sorting the image
    mask = prob >= threshold
    labels, components = ndimage.label(mask)
    values = dict.fromkeys(DESCRIPTOR_NAMES, 0.0)
    values.update(components=float(components), mask_fraction=float(mask.mean()), max_probability=float(flat.max()),
                  top_probability=float(top))
    if components:
        sizes = np.bincount(labels.ravel())[1:]
        lesion = ndimage.binary_fill_holes(labels == np.argmax(sizes) + 1)
        rows, cols = np.nonzero(lesion)
        area = float(lesion.sum())
        perimeter = _perimeter(lesion)
        ring_width = max(1, int(round(RING * h)))
        ring = ndimage.binary_dilation(lesion, np.ones((3, 3), bool), iterations=ring_width) & ~lesion
        inside = image[lesion]
        below = image[rows.max() + 1:rows.max() + 1 + max(1, int(round(BELOW * h))), cols.min():cols.max() + 1]
        values.update(
            area=area / (h * w),
            height_over_width=(rows.max() - rows.min() + 1) / (cols.max() - cols.min() + 1),
            circularity=4 * np.pi * area / perimeter ** 2,
            solidity=area / _convex_hull_area(rows, cols),
            margin_irregularity=perimeter / np.sqrt(area),
            mean_inside=float(inside.mean()),
            mean_around=float(image[ring].mean()) if ring.any() else float(inside.mean()),
            heterogeneity=float(inside.std()),
            posterior=float(below.mean() - inside.mean()) if below.size else 0.0,
            depth=float(rows.mean()) / h,
        )
        values["contrast"] = values["mean_inside"] - values["mean_around"]
    return np.array([values[n] for n in DESCRIPTOR_NAMES], np.float64)


# ----------------------------------------------------------------------------- in TensorFlow
# The same descriptors as TensorFlow ops, so that a SavedModel can measure them while it
# serves (`tf-bus export` of a `tf-bus fuse` result). Every step follows the NumPy version:
# 4-connected components (scipy.ndimage.label's default) with the largest kept (ties: the
# one whose first pixel comes first in raster order, as scipy numbers them), holes filled
# through 4-connected background (binary_fill_holes'), the ring as a square dilation with
# the border outside, and the convex hull of the pixel corners computed exactly in integer
# arithmetic. Tested equal to ``lesion_descriptors`` to 1e-12.


def _tf_runs(mask):
    """Run numbers of a boolean (H, W) mask, flat and non-decreasing in raster order: a run
    is an unbroken stretch of marked pixels along a row. Unmarked pixels carry the number of
    the run before them (their label never lowers its minimum)."""
    import tensorflow as tf

    starts = mask & ~tf.pad(mask[:, :-1], [[0, 0], [1, 0]])
    return tf.cumsum(tf.cast(tf.reshape(starts, [-1]), tf.int32))


def _tf_run_min(labels, mask, runs, big):
    """Every marked pixel gets the smallest label of its run: one segmented minimum, however
    long the runs."""
    import tensorflow as tf

    smallest = tf.math.segment_min(tf.reshape(labels, [-1]), runs)
    return tf.where(mask, tf.reshape(tf.gather(smallest, runs), tf.shape(labels)), big)


def _tf_components(mask, connectivity: int = 4):
    """(labels, count) of a boolean (H, W) mask: each marked pixel's label is the flat index
    of its component's first pixel (raster order); unmarked pixels get H*W. Components are
    4- or 8-connected. Minimum propagation: each step gives every pixel the smallest label
    of its row run, then of its column run (so a straight stretch of any length costs one
    step), then (8-connected) of its diagonal neighbours, then each label its own label
    (pointer jumping). A labyrinth of 480 x 560 pixels converges in tens of steps."""
    import tensorflow as tf

    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8. Received: {connectivity}")
    h, w = tf.shape(mask)[0], tf.shape(mask)[1]
    big = h * w
    index = tf.reshape(tf.range(big), [h, w])
    mask_t = tf.transpose(mask)
    rows, cols = _tf_runs(mask), _tf_runs(mask_t)

    def step(labels, _):
        m = _tf_run_min(labels, mask, rows, big)
        m = tf.transpose(_tf_run_min(tf.transpose(m), mask_t, cols, big))
        if connectivity == 8:
            p = tf.pad(m, [[1, 1], [1, 1]], constant_values=big)
            diagonal = tf.minimum(tf.minimum(p[:-2, :-2], p[:-2, 2:]), tf.minimum(p[2:, :-2], p[2:, 2:]))
            m = tf.where(mask, tf.minimum(m, diagonal), big)
        flat = tf.reshape(m, [-1])
        jumped = tf.reshape(tf.gather(tf.concat([flat, [big]], 0), flat), tf.shape(labels))  # a label's own label
        jumped.set_shape(labels.shape)
        return jumped, tf.reduce_any(jumped != labels)

    labels, _ = tf.while_loop(lambda labels, changed: changed, step,
                              (tf.where(mask, index, big), tf.constant(True)))
    return labels, tf.reduce_sum(tf.cast(mask & tf.equal(labels, index), tf.int32))


def _tf_largest_filled(mask, labels):
    """The largest component of ``labels`` (ties: the first in raster order, as scipy
    numbers them) with its holes filled through 4-connected background (scipy's
    binary_fill_holes). Returns (the filled component over the whole image, its box with a
    one-pixel background frame, and the box's first and last row and column)."""
    import tensorflow as tf

    h, w = tf.shape(mask)[0], tf.shape(mask)[1]
    sizes = tf.math.bincount(tf.boolean_mask(labels, mask), minlength=h * w, maxlength=h * w)
    first = tf.reduce_min(tf.where(tf.equal(sizes, tf.reduce_max(sizes)))[:, 0])
    largest = tf.equal(labels, tf.cast(first, labels.dtype))
    r = tf.where(tf.reduce_any(largest, axis=1))[:, 0]
    c = tf.where(tf.reduce_any(largest, axis=0))[:, 0]
    r0, r1, c0, c1 = (tf.cast(v, tf.int32) for v in (r[0], r[-1], c[0], c[-1]))
    # Holes: background of the framed box not 4-connected to the frame, whose first pixel has label 0.
    box = tf.pad(largest[r0:r1 + 1, c0:c1 + 1], [[1, 1], [1, 1]])
    background, _ = _tf_components(~box)
    framed = box | (~box & tf.not_equal(background, 0))
    whole = tf.pad(framed[1:-1, 1:-1], [[r0, h - r1 - 1], [c0, w - c1 - 1]])
    return whole, framed, (r0, r1, c0, c1)


def largest_component_tf(mask, connectivity: int = 8):
    """``tf_bus.evaluation.postprocess_mask(mask, "largest")`` as TensorFlow ops: the
    largest 8-connected component of a boolean (H, W) mask, holes filled; an empty mask
    stays empty. Exported segmenters apply it when evaluation chose ``largest``."""
    import tensorflow as tf

    mask = tf.convert_to_tensor(mask, tf.bool)
    labels, count = _tf_components(mask, connectivity)
    return tf.cond(count > 0, lambda: _tf_largest_filled(mask, labels)[0], lambda: mask)


def _tf_half_hull(points):
    """Andrew's monotone chain over (N, 2) int64 points sorted lexicographically: the chain's
    vertices, turning left, collinear points dropped."""
    import tensorflow as tf

    n = tf.shape(points)[0]

    def push(i, top, stack):
        p = points[i]

        def turns_right(t):
            a, b = stack[tf.maximum(t - 2, 0)], stack[tf.maximum(t - 1, 0)]
            cross = (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])
            return tf.logical_and(t >= 2, cross <= 0)

        (top,) = tf.while_loop(turns_right, lambda t: (t - 1,), (top,))
        stack = tf.tensor_scatter_nd_update(stack, [[top]], [p])
        return i + 1, top + 1, stack

    _, top, stack = tf.while_loop(lambda i, top, stack: i < n, push, (0, 0, tf.zeros_like(points)))
    return stack[:top]


def _tf_hull_area(filled):
    """Area of the convex hull of a boolean (H, W) region's pixel corners, exactly: only the
    outer corners of each row's first and last pixel can be hull vertices; coordinates are
    doubled to stay integers."""
    import tensorflow as tf

    cols = tf.range(tf.shape(filled)[1], dtype=tf.int64)
    rows = tf.where(tf.reduce_any(filled, axis=1))[:, 0]
    f = tf.gather(filled, rows)
    first = tf.reduce_min(tf.where(f, cols, tf.int64.max), axis=1)
    last = tf.reduce_max(tf.where(f, cols, -1), axis=1)
    x = tf.concat([2 * rows - 1, 2 * rows + 1], 0)
    x = tf.concat([x, x], 0)
    y = tf.concat([2 * first - 1, 2 * first - 1, 2 * last + 1, 2 * last + 1], 0)
    stride = 2 * tf.cast(tf.shape(filled)[1], tf.int64) + 4
    keys, _ = tf.unique(tf.sort(x * stride + (y + 2)))  # lexicographic (x, y), duplicates dropped
    points = tf.stack([keys // stride, keys % stride - 2], axis=1)
    lower, upper = _tf_half_hull(points), _tf_half_hull(tf.reverse(points, [0]))
    hull = tf.concat([lower[:-1], upper[:-1]], 0)
    following = tf.roll(hull, -1, axis=0)
    twice = tf.reduce_sum(hull[:, 0] * following[:, 1] - following[:, 0] * hull[:, 1])
    return tf.cast(tf.abs(twice), tf.float64) / 8.0  # shoelace / 2, in doubled coordinates / 4


def _tf_window_any(mask, radius):
    """Square dilation of a boolean (H, W) mask by ``radius`` pixels (outside the image
    counts as unmarked), from an integral image."""
    import tensorflow as tf

    h, w = tf.shape(mask)[0], tf.shape(mask)[1]
    integral = tf.pad(tf.cumsum(tf.cumsum(tf.cast(mask, tf.int32), 0), 1), [[1, 0], [1, 0]])
    lo_r, hi_r = tf.clip_by_value(tf.range(h) - radius, 0, h), tf.clip_by_value(tf.range(h) + radius + 1, 0, h)
    lo_c, hi_c = tf.clip_by_value(tf.range(w) - radius, 0, w), tf.clip_by_value(tf.range(w) + radius + 1, 0, w)

    def corner(r, c):
        return tf.gather(tf.gather(integral, r, axis=0), c, axis=1)

    return corner(hi_r, hi_c) - corner(lo_r, hi_c) - corner(hi_r, lo_c) + corner(lo_r, lo_c) > 0


def lesion_descriptors_tf(image, probabilities, threshold):
    """``lesion_descriptors`` as TensorFlow ops (graph- and SavedModel-safe).

    Args:
        image: (H, W) grey levels in [0, 1].
        probabilities: (H, W) lesion probabilities at the image's resolution.
        threshold: scalar; probabilities at or above it are lesion.

    Returns:
        float64 (``len(DESCRIPTOR_NAMES)``,) tensor.
    """
    import tensorflow as tf

    image = tf.cast(image, tf.float64)
    prob = tf.cast(probabilities, tf.float64)
    threshold = tf.cast(threshold, tf.float64)
    h, w = tf.shape(prob)[0], tf.shape(prob)[1]
    hf, size = tf.cast(h, tf.float64), tf.cast(h * w, tf.float64)
    flat = tf.reshape(prob, [-1])
    k = tf.maximum(1, tf.cast(tf.round(TOP_SHARE * size), tf.int32))
    top = tf.reduce_mean(tf.math.top_k(flat, k, sorted=False).values)
    mask = prob >= threshold
    labels, components = _tf_components(mask)
    always = {"components": tf.cast(components, tf.float64), "mask_fraction": tf.reduce_mean(tf.cast(mask, tf.float64)),
              "max_probability": tf.reduce_max(flat), "top_probability": top}

    def measured():
        lesion, framed, (r0, r1, c0, c1) = _tf_largest_filled(mask, labels)
        inner = framed[1:-1, 1:-1]
        area = tf.reduce_sum(tf.cast(inner, tf.float64))
        as_int = tf.cast(framed, tf.int32)
        edges = tf.reduce_sum(tf.abs(as_int[1:] - as_int[:-1])) + tf.reduce_sum(tf.abs(as_int[:, 1:] - as_int[:, :-1]))
        perimeter = tf.cast(edges, tf.float64) * np.pi / 4
        row_sum = tf.reduce_sum(tf.cast(tf.where(inner)[:, 0], tf.float64)) + tf.cast(r0, tf.float64) * area
        ring_width = tf.maximum(1, tf.cast(tf.round(RING * hf), tf.int32))
        ring = _tf_window_any(lesion, ring_width) & ~lesion
        inside = tf.boolean_mask(image, lesion)
        mean_inside = tf.reduce_mean(inside)
        around = tf.boolean_mask(image, ring)
        below_rows = tf.maximum(1, tf.cast(tf.round(BELOW * hf), tf.int32))
        below = image[r1 + 1:r1 + 1 + below_rows, c0:c1 + 1]
        mean_around = tf.cond(tf.size(around) > 0, lambda: tf.reduce_mean(around), lambda: mean_inside)
        out = {
            "area": area / size,
            "height_over_width": tf.cast(r1 - r0 + 1, tf.float64) / tf.cast(c1 - c0 + 1, tf.float64),
            "circularity": 4 * np.pi * area / perimeter ** 2,
            "solidity": area / _tf_hull_area(inner),
            "margin_irregularity": perimeter / tf.sqrt(area),
            "mean_inside": mean_inside,
            "mean_around": mean_around,
            "contrast": mean_inside - mean_around,
            "heterogeneity": tf.math.reduce_std(inside),
            "posterior": tf.cond(tf.size(below) > 0, lambda: tf.reduce_mean(below) - mean_inside,
                                 lambda: tf.constant(0.0, tf.float64)),
            "depth": row_sum / area / hf,
        }
        return tf.stack([out[n] if n in out else always[n] for n in DESCRIPTOR_NAMES])

    def empty():
        return tf.stack([always.get(n, tf.constant(0.0, tf.float64)) for n in DESCRIPTOR_NAMES])

    return tf.cond(components > 0, measured, empty)
