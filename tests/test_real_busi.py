"""Integration tests on the real BUSI copy in ../shared/busi (read-only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tf_bus.config import CLASS_NAMES, SPLITS, LoaderConfig
from tf_bus.data.busi import BusiDataError, read_release, scan_release
from tf_bus.data.pipeline import classification_dataset, segmentation_dataset

pytestmark = [pytest.mark.real_data, pytest.mark.slow]

REAL_COUNTS = {"benign": 327, "malignant": 157, "normal": 100}


def test_prepare_real_busi(real_prepared, real_busi):
    manifest = json.loads((real_prepared / "manifest.json").read_text())
    before = manifest["counts_before_balancing"]
    for c in CLASS_NAMES:
        assert sum(before[s][c] for s in SPLITS) == REAL_COUNTS[c]
        for s, frac in zip(SPLITS, (0.70, 0.15, 0.15)):
            assert abs(before[s][c] / REAL_COUNTS[c] - frac) < 0.03, (s, c)
    splits = json.loads((real_prepared / "splits.json").read_text())["cases"]
    dups = json.loads((real_prepared / "duplicates.json").read_text())
    for g in dups["groups"]:
        assert len({splits[c] for c in g}) == 1, f"group {g} straddles splits"
    assert ["benign/benign (433)", "malignant/malignant (145)"] in dups["exact_duplicates"]
    assert any({"benign/benign (433)", "malignant/malignant (145)"} <= set(g) for g in dups["cross_class_groups"])
    assert 30 <= len(dups["groups"]) <= 250, "BUSI holds many near-duplicate groups, not one giant one"
    assert max(len(g) for g in dups["groups"]) <= 20
    after = manifest["counts_after_balancing"]
    assert len(set(after["train"].values())) == 1 and after["test"] == before["test"]


def test_real_mask_modes_and_multi_masks(real_busi):
    read = read_release(real_busi)
    modes = {m for i in read.infos for m in i.mask_modes}
    assert {"L", "1", "RGB"} <= modes
    multi = [i for i in read.infos if i.lesion_components > 1]
    assert multi
    for info in multi[:3]:
        union = np.zeros((info.height, info.width), bool)
        for p in info.case.mask_paths:
            union |= np.asarray(Image.open(p).convert("L")) > 127
        assert abs(union.mean() - info.lesion_fraction) < 1e-9


@pytest.mark.parametrize("source", ["prepared", "release"])
def test_real_loaders(source, real_prepared, real_busi):
    cfg = LoaderConfig(image_size=(64, 64), batch_size=32)
    data = real_prepared if source == "prepared" else real_busi
    splits_file = real_prepared / "splits.json"
    manifest = json.loads((real_prepared / "manifest.json").read_text())
    n_test = sum(manifest["counts_before_balancing"]["test"].values())
    xs, ms, names = [], [], []
    for x, m, n in segmentation_dataset(data, "test", cfg, include_names=True, splits_file=splits_file):
        xs.append(x.numpy()); ms.append(m.numpy()); names += [s.decode() for s in n.numpy()]
    x, m = np.concatenate(xs), np.concatenate(ms)
    assert len(names) == n_test == len(set(names))
    assert x.shape[1:] == (64, 64, 3) and 0 <= x.min() and x.max() <= 1
    assert set(np.unique(m)) == {0.0, 1.0}
    for i, name in enumerate(names):
        assert (m[i].sum() > 0) == (not name.startswith("normal")), name
    y = np.concatenate([b.numpy() for _, b in classification_dataset(data, "test", cfg, splits_file=splits_file)])
    assert np.bincount(y, minlength=3).tolist() == [manifest["counts_before_balancing"]["test"][c] for c in CLASS_NAMES]


def test_release_masks_equal_layout_masks(real_prepared, real_busi):
    cfg = LoaderConfig(image_size=(96, 96), batch_size=64)
    def masks(data):
        out = {}
        for _, m, n in segmentation_dataset(data, "validation", cfg, include_names=True,
                                            splits_file=real_prepared / "splits.json"):
            out.update({k.decode(): v for k, v in zip(n.numpy(), m.numpy())})
        return out
    a, b = masks(real_busi), masks(real_prepared)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _subset(real_busi: Path, tmp_path: Path) -> Path:
    root = tmp_path / "Dataset_BUSI_with_GT"
    for case in [c for c in scan_release(real_busi).cases if c.label == "benign"][:4] + \
            [c for c in scan_release(real_busi).cases if c.label != "benign"][:2]:
        d = root / case.label
        d.mkdir(parents=True, exist_ok=True)
        for p in (case.image_path,) + case.mask_paths:
            shutil.copy(p, d)
    (root / "normal").mkdir(exist_ok=True)
    for c in [c for c in scan_release(real_busi).cases if c.label == "normal"][:2]:
        for p in (c.image_path,) + c.mask_paths:
            shutil.copy(p, root / "normal")
    return root


def _first(root, label, pattern):
    return sorted((root / label).glob(pattern))[0]


REAL_BREAKERS = [
    ("unreadable", lambda r: (lambda p: (p.write_bytes(p.read_bytes()[:2000]), p)[1])(_first(r, "benign", "*).png"))),
    ("size_mismatch", lambda r: (lambda p: (Image.open(p).resize((50, 40)).save(p), p)[1])(_first(r, "benign", "*_mask.png"))),
    ("image_without_mask", lambda r: (lambda p: (p.unlink(), p.with_name(p.name.replace("_mask", "")))[1])(_first(r, "normal", "*_mask.png"))),
    ("mask_without_image", lambda r: (lambda p: (p.unlink(), p.with_name(p.stem + "_mask.png"))[1])(_first(r, "benign", "*).png"))),
    ("not_an_image", lambda r: (lambda p: (p.write_text("x"), p)[1])(r / "benign" / "readme.txt")),
]


@pytest.mark.parametrize("kind,breaker", REAL_BREAKERS, ids=[k for k, _ in REAL_BREAKERS])
def test_bad_real_files(kind, breaker, real_busi, tmp_path):
    root = _subset(real_busi, tmp_path)
    bad = str(breaker(root))
    with pytest.raises(BusiDataError) as err:
        read_release(root)
    assert any(p.kind == kind and p.path == bad for p in err.value.problems), err.value
    kept = read_release(root, skip_bad=True)
    assert len(kept.problems) == 1 and len(kept.infos) >= 6
