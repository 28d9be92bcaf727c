"""Synthetic BUSI-like data: layout, determinism, realism checks that could fail."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tf_bus.data.busi import TfBusError, read_release
from tf_bus.data.synthetic import class_sizes, make_synthetic
from conftest import tree_digest


def test_same_seed_same_files(tmp_path):
    a = make_synthetic(tmp_path / "a", n=12, seed=4)
    b = make_synthetic(tmp_path / "b", n=12, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_classes_masks_and_lesions(synthetic_release):
    read = read_release(synthetic_release)
    by = {c: [i for i in read.infos if i.case.label == c] for c in ("benign", "malignant", "normal")}
    assert {c: len(v) for c, v in by.items()} == class_sizes(36)
    assert all(i.lesion_fraction == 0 for i in by["normal"])
    assert all(0.005 < i.lesion_fraction < 0.4 for i in by["benign"] + by["malignant"])
    assert any(i.lesion_components > 1 for i in by["benign"]), "multi-mask cases exist"
    modes = {m for i in read.infos for m in i.mask_modes}
    assert {"1", "L", "RGB", "RGBA", "P"} <= modes
    # Lesions are hypoechoic: darker inside the mask than outside.
    info = by["malignant"][0]
    img = np.asarray(Image.open(info.case.image_path).convert("L"), np.float32)
    mask = np.asarray(Image.open(info.case.mask_paths[0]).convert("L")) > 127
    assert img[mask].mean() < 0.6 * img[~mask].mean()


def test_refuses_existing_and_tiny(tmp_path):
    make_synthetic(tmp_path / "s", n=9)
    before = tree_digest(tmp_path / "s")
    with pytest.raises(TfBusError, match="--overwrite"):
        make_synthetic(tmp_path / "s", n=9)
    assert tree_digest(tmp_path / "s") == before
    with pytest.raises(TfBusError, match="at least 9"):
        make_synthetic(tmp_path / "t", n=3)
