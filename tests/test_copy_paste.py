"""Copy-paste augmentation of the U-Net's training batches (tf_bus.training.segmentation.copy_paste)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from tf_bus.training.segmentation import copy_paste

SIZE, SHIFT = 32, 0.25
SQUARE = np.ones((3, 3), bool)  # the blur's 5x5 kernel reaches 2 pixels, diagonals too


def _batch():
    """Rows 0 and 1 have no lesion; rows 2 and 3 have one: a block with a notch on its
    right (so a mirror image is told apart), of a different size each. Every image is a
    constant of its own, so a pasted pixel shows where it came from."""
    images = np.stack([np.full((SIZE, SIZE, 1), 0.1 * (i + 1), np.float32) for i in range(4)])
    masks = np.zeros((4, SIZE, SIZE, 1), np.float32)
    for i, (h, w) in ((2, (6, 5)), (3, (8, 7))):
        masks[i, 12:12 + h, 12:12 + w] = 1
        masks[i, 12:14, 12 + w:14 + w] = 1
    return images, masks


def _placements(source: np.ndarray, target: np.ndarray) -> list[tuple[bool, int, int]]:
    """The (mirrored, dy, dx) within the shift range that move ``source`` onto ``target``."""
    limit = int(SHIFT * SIZE)
    found = []
    for mirrored in (False, True):
        s = source[:, ::-1] if mirrored else source
        for dy in range(-limit, limit + 1):
            for dx in range(-limit, limit + 1):
                if np.array_equal(ndimage.shift(s, (dy, dx), order=0, cval=0), target):
                    found.append((mirrored, dy, dx))
    return found


def test_copy_paste_blends_a_partners_lesion_flipped_and_shifted_into_the_image():
    images, masks = _batch()
    ds = tf.data.Dataset.from_tensors((images, masks)).repeat(40)
    radius = 2  # copy_paste's default sigma 1 gives a 5x5 kernel
    placements, unchanged = set(), 0
    for out_images, out_masks in copy_paste(ds, 1.0, seed=3, max_shift=SHIFT).as_numpy_iterator():
        for i in range(4):
            own, new, image = masks[i, ..., 0], out_masks[i, ..., 0], out_images[i, ..., 0]
            assert set(np.unique(new)) <= {0.0, 1.0}, "masks stay binary"
            assert np.all(new >= own), "a row keeps its own lesion"
            if np.array_equal(new, own):  # its partner had no lesion (or was itself, overlapping exactly)
                if i < 2:
                    np.testing.assert_array_equal(image, images[i, ..., 0])
                unchanged += 1
                continue
            if i >= 2:
                continue  # overlapping pastes on rows with a lesion: checked through the union above
            partner = [j for j in (2, 3) if new.sum() == masks[j, ..., 0].sum()]
            assert len(partner) == 1, "the pasted mask is one partner's, whole (the shifts keep it in view)"
            j = partner[0]
            found = _placements(masks[j, ..., 0], new)
            assert len(found) == 1, "a mirrored and/or shifted copy of the partner's mask"
            placements.add(found[0])
            inside = ndimage.binary_erosion(new, SQUARE, iterations=radius)
            outside = ~ndimage.binary_dilation(new, SQUARE, iterations=radius)
            np.testing.assert_allclose(image[inside], 0.1 * (j + 1), rtol=1e-5)  # the partner's pixels
            np.testing.assert_array_equal(image[outside], images[i, 0, 0, 0])  # untouched away from it
            seam = ~inside & ~outside
            lo, hi = sorted((0.1 * (i + 1), 0.1 * (j + 1)))
            assert np.all((image[seam] >= lo - 1e-6) & (image[seam] <= hi + 1e-6)), "blended at the seam"
            assert 0 < np.sum((image[seam] > lo + 1e-3) & (image[seam] < hi - 1e-3)), "a soft edge, no hard seam"
    assert unchanged > 0 and len(placements) > 10
    assert {m for m, _, _ in placements} == {False, True}, "both orientations occur"


@pytest.mark.parametrize("probability", [0.0, 0.5])
def test_copy_paste_probability_and_seed(probability):
    images, masks = _batch()
    ds = tf.data.Dataset.from_tensors((images, masks)).repeat(60)
    out = list(copy_paste(ds, probability, seed=3).as_numpy_iterator())
    changed = np.mean([not np.array_equal(m[i], masks[i]) for _, m in out for i in (0, 1)])
    if probability == 0:
        for x, m in out:
            np.testing.assert_array_equal(x, images)
            np.testing.assert_array_equal(m, masks)
    else:
        # A lesion-less row gains one when chosen (p) and paired with a lesion row (1/2).
        assert 0.1 < changed < 0.45, changed
        again = list(copy_paste(ds, probability, seed=3).as_numpy_iterator())
        other = list(copy_paste(ds, probability, seed=4).as_numpy_iterator())
        assert all(np.array_equal(a[1], b[1]) for a, b in zip(out, again)), "seeded"
        assert not all(np.array_equal(a[1], b[1]) for a, b in zip(out, other))
