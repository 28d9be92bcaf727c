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
