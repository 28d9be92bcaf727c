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
    # The margin (BI-RADS: circumscribed, or indistinct / angular / microlobulated / spiculated),
    # read off the image across the U-Net's outline rather than off the outline itself, which
    # the U-Net draws smoother than the annotators did (README, "Where the rest of the gap lies").
    "margin_contrast": "mean grey level of the ring around the lesion - of the band just inside it (both 2% of "
                       "the image height wide)",
    "margin_variation": "standard deviation of that contrast over the eight octants around the lesion's centroid "
                        "(a partly indistinct margin varies)",
    "around_variation": "standard deviation of the ring's mean grey level over the eight octants",
    "margin_sharpness": "mean grey-level gradient on the outline, of the image smoothed by a box 1% of the image "
                        "height wide (grey levels per pixel, 0..1 scale)",
    "margin_fuzziness": "mean of 4 p (1 - p) over the ring and the inner band: how unsure the U-Net is where the "
                        "margin lies",
    "radius_variation": "coefficient of variation of the outline's distance from the centroid",
}
DESCRIPTOR_NAMES: tuple[str, ...] = tuple(DESCRIPTORS)

RING = 0.02  # of the image height
BELOW = 0.08
TOP_SHARE = 0.002
SMOOTH = 0.005  # box radius for margin_sharpness, of the image height


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


def _box_mean(grey: np.ndarray, radius: int) -> np.ndarray:
    """Mean of integer grey levels over the (2 radius + 1)^2 window around each pixel, the
    window clipped to the image; window sums from an integer integral image (exact)."""
    h, w = grey.shape
    integral = np.zeros((h + 1, w + 1), np.int64)
    integral[1:, 1:] = grey.astype(np.int64).cumsum(0).cumsum(1)
    lo_r, hi_r = np.clip(np.arange(h) - radius, 0, h), np.clip(np.arange(h) + radius + 1, 0, h)
    lo_c, hi_c = np.clip(np.arange(w) - radius, 0, w), np.clip(np.arange(w) + radius + 1, 0, w)
    sums = (integral[hi_r][:, hi_c] - integral[lo_r][:, hi_c]) - (integral[hi_r][:, lo_c] - integral[lo_r][:, lo_c])
    return sums / np.outer(hi_r - lo_r, hi_c - lo_c)


def _octant(rows: np.ndarray, cols: np.ndarray, n: int, row_sum: int, col_sum: int) -> np.ndarray:
    """0..7: the 45-degree sector around the centroid (row_sum / n, col_sum / n) of each
    pixel, in integer arithmetic (no angle is computed, so no rounding can move a pixel)."""
    dy = rows.astype(np.int64) * n - row_sum
    dx = cols.astype(np.int64) * n - col_sum
    return (dy >= 0) * 4 + (dx >= 0) * 2 + (np.abs(dy) > np.abs(dx))


def _margin_descriptors(image, prob, lesion, ring, ring_width) -> dict[str, float]:
    """The margin descriptors (``DESCRIPTORS``, from ``margin_contrast`` on) of a non-empty lesion."""
    from scipy import ndimage

    h = lesion.shape[0]
    inner = lesion & ndimage.binary_dilation(~lesion, np.ones((3, 3), bool), iterations=ring_width)
    band = ring | inner
    rows, cols = np.nonzero(lesion)
    n, row_sum, col_sum = rows.size, int(rows.sum()), int(cols.sum())
    ring_r, ring_c = np.nonzero(ring)
    in_r, in_c = np.nonzero(inner)
    ring_o, in_o = _octant(ring_r, ring_c, n, row_sum, col_sum), _octant(in_r, in_c, n, row_sum, col_sum)
    ring_v, in_v = image[ring_r, ring_c], image[in_r, in_c]
    around = [ring_v[ring_o == o].mean() for o in range(8) if (ring_o == o).any()]
    contrasts = [ring_v[ring_o == o].mean() - in_v[in_o == o].mean() for o in range(8)
                 if (ring_o == o).any() and (in_o == o).any()]
    # Outline: lesion pixels with a 4-neighbour outside it (the image border does not count).
    p = np.pad(lesion, 1, constant_values=True)
    edge = lesion & ~(p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:])
    smooth = _box_mean(np.round(image * 255), max(1, int(round(SMOOTH * h))))
    hh, ww = smooth.shape
    down, up = np.minimum(np.arange(hh) + 1, hh - 1), np.maximum(np.arange(hh) - 1, 0)
    right, left = np.minimum(np.arange(ww) + 1, ww - 1), np.maximum(np.arange(ww) - 1, 0)
    gy = (smooth[down] - smooth[up]) / 2
    gx = (smooth[:, right] - smooth[:, left]) / 2
    gradient = np.sqrt(gy * gy + gx * gx) / 255
    er, ec = np.nonzero(edge)
    dy, dx = er.astype(np.int64) * n - row_sum, ec.astype(np.int64) * n - col_sum
    radius = np.sqrt((dy * dy + dx * dx).astype(np.float64))
    return {
        "margin_contrast": float(ring_v.mean() - in_v.mean()) if ring_v.size and in_v.size else 0.0,
        "margin_variation": float(np.std(contrasts)) if len(contrasts) > 1 else 0.0,
        "around_variation": float(np.std(around)) if len(around) > 1 else 0.0,
        "margin_sharpness": float(gradient[edge].mean()) if edge.any() else 0.0,
        "margin_fuzziness": float((4 * prob * (1 - prob))[band].mean()) if band.any() else 0.0,
        "radius_variation": float(radius.std() / radius.mean()) if radius.size and radius.mean() > 0 else 0.0,
    }


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
        values.update(_margin_descriptors(image, prob, lesion, ring, ring_width))
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


def _tf_window_sums(values, radius):
    """(sums, counts): sums of integer (H, W) ``values`` over the (2 radius + 1)^2 window
    around each pixel, the window clipped to the image, from an integral image (exact);
    counts: the float64 number of pixels in each clipped window."""
    import tensorflow as tf

    h, w = tf.shape(values)[0], tf.shape(values)[1]
    integral = tf.pad(tf.cumsum(tf.cumsum(values, 0), 1), [[1, 0], [1, 0]])
    lo_r, hi_r = tf.clip_by_value(tf.range(h) - radius, 0, h), tf.clip_by_value(tf.range(h) + radius + 1, 0, h)
    lo_c, hi_c = tf.clip_by_value(tf.range(w) - radius, 0, w), tf.clip_by_value(tf.range(w) + radius + 1, 0, w)

    def corner(r, c):
        return tf.gather(tf.gather(integral, r, axis=0), c, axis=1)

    sums = (corner(hi_r, hi_c) - corner(lo_r, hi_c)) - (corner(hi_r, lo_c) - corner(lo_r, lo_c))
    counts = tf.cast(hi_r - lo_r, tf.float64)[:, None] * tf.cast(hi_c - lo_c, tf.float64)[None, :]
    return sums, counts


def _tf_window_any(mask, radius):
    """Square dilation of a boolean (H, W) mask by ``radius`` pixels (outside the image
    counts as unmarked)."""
    import tensorflow as tf

    return _tf_window_sums(tf.cast(mask, tf.int32), radius)[0] > 0


def _tf_octant(points, n, row_sum, col_sum):
    """``_octant`` of (N, 2) int64 (row, col) points."""
    import tensorflow as tf

    dy, dx = points[:, 0] * n - row_sum, points[:, 1] * n - col_sum
    return (tf.cast(dy >= 0, tf.int32) * 4 + tf.cast(dx >= 0, tf.int32) * 2
            + tf.cast(tf.abs(dy) > tf.abs(dx), tf.int32))


def _tf_octant_means(values, octants):
    """(means, present) over the eight octants."""
    import tensorflow as tf

    sums = tf.math.unsorted_segment_sum(values, octants, 8)
    counts = tf.math.unsorted_segment_sum(tf.ones_like(values), octants, 8)
    return sums / tf.maximum(counts, 1.0), counts > 0


def _tf_std_if_several(values):
    import tensorflow as tf

    return tf.cond(tf.size(values) > 1, lambda: tf.math.reduce_std(values), lambda: tf.constant(0.0, tf.float64))


def _tf_mean_or_zero(values):
    import tensorflow as tf

    return tf.cond(tf.size(values) > 0, lambda: tf.reduce_mean(values), lambda: tf.constant(0.0, tf.float64))


def _tf_box_mean(grey, radius):
    """``_box_mean`` of (H, W) int64 grey levels."""
    import tensorflow as tf

    sums, counts = _tf_window_sums(grey, radius)
    return tf.cast(sums, tf.float64) / counts


def _tf_margin_descriptors(image, prob, lesion, ring, ring_width, hf):
    """``_margin_descriptors`` as TensorFlow ops."""
    import tensorflow as tf

    inner = lesion & _tf_window_any(~lesion, ring_width)
    band = ring | inner
    points = tf.where(lesion)
    n = tf.shape(points, out_type=tf.int64)[0]
    row_sum, col_sum = tf.reduce_sum(points[:, 0]), tf.reduce_sum(points[:, 1])
    ring_p, inner_p = tf.where(ring), tf.where(inner)
    ring_v, in_v = tf.gather_nd(image, ring_p), tf.gather_nd(image, inner_p)
    ring_m, ring_has = _tf_octant_means(ring_v, _tf_octant(ring_p, n, row_sum, col_sum))
    in_m, in_has = _tf_octant_means(in_v, _tf_octant(inner_p, n, row_sum, col_sum))
    both = ring_has & in_has
    p = tf.pad(lesion, [[1, 1], [1, 1]], constant_values=True)
    edge = lesion & ~(p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:])
    smooth = _tf_box_mean(tf.cast(tf.round(image * 255), tf.int64),
                          tf.maximum(1, tf.cast(tf.round(SMOOTH * hf), tf.int32)))
    hh, ww = tf.shape(smooth)[0], tf.shape(smooth)[1]
    down, up = tf.minimum(tf.range(hh) + 1, hh - 1), tf.maximum(tf.range(hh) - 1, 0)
    right, left = tf.minimum(tf.range(ww) + 1, ww - 1), tf.maximum(tf.range(ww) - 1, 0)
    gy = (tf.gather(smooth, down) - tf.gather(smooth, up)) / 2
    gx = (tf.gather(smooth, right, axis=1) - tf.gather(smooth, left, axis=1)) / 2
    gradient = tf.sqrt(gy * gy + gx * gx) / 255
    edge_p = tf.where(edge)
    dy, dx = edge_p[:, 0] * n - row_sum, edge_p[:, 1] * n - col_sum
    radius = tf.sqrt(tf.cast(dy * dy + dx * dx, tf.float64))
    radius_mean = _tf_mean_or_zero(radius)
    both_sides = (tf.size(ring_v) > 0) & (tf.size(in_v) > 0)
    return {
        "margin_contrast": tf.cond(both_sides, lambda: tf.reduce_mean(ring_v) - tf.reduce_mean(in_v),
                                   lambda: tf.constant(0.0, tf.float64)),
        "margin_variation": _tf_std_if_several(tf.boolean_mask(ring_m - in_m, both)),
        "around_variation": _tf_std_if_several(tf.boolean_mask(ring_m, ring_has)),
        "margin_sharpness": _tf_mean_or_zero(tf.gather_nd(gradient, edge_p)),
        "margin_fuzziness": _tf_mean_or_zero(tf.boolean_mask(4.0 * prob * (1.0 - prob), band)),
        "radius_variation": tf.cond(radius_mean > 0, lambda: tf.math.reduce_std(radius) / radius_mean,
                                    lambda: tf.constant(0.0, tf.float64)),
    }


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
        out.update(_tf_margin_descriptors(image, prob, lesion, ring, ring_width, hf))
        return tf.stack([out[n] if n in out else always[n] for n in DESCRIPTOR_NAMES])

    def empty():
        return tf.stack([always.get(n, tf.constant(0.0, tf.float64)) for n in DESCRIPTOR_NAMES])

    return tf.cond(components > 0, measured, empty)
