"""`prepare`: both layouts, balancing of train only, atomic output, split reuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tf_bus.config import CLASS_NAMES, SEGMENTATION_DIRS, SPLITS, BalanceConfig, PrepareConfig
from tf_bus.data.busi import BusiDataError, TfBusError, load_mask, read_release
from tf_bus.data.layouts import AUG_MARK, layout_stem, prepare
from conftest import tree_digest


def test_layout_folders_and_pairing(prepared, synthetic_release):
    splits = json.loads((prepared / "splits.json").read_text())["cases"]
    read = read_release(synthetic_release)
    for info in read.infos:
        split = splits[info.case.case_id]
        stem = layout_stem(info)
        assert (prepared / "classification" / split / info.case.label / f"{stem}.png").is_file()
        img_dir, mask_dir = SEGMENTATION_DIRS[split]
        img = prepared / "segmentation" / img_dir / f"{stem}.png"
        mask = prepared / "segmentation" / mask_dir / f"{stem}_mask.png"
        assert img.read_bytes() == Path(info.case.image_path).read_bytes(), "images are copied unchanged"
        with Image.open(mask) as m:
            arr = np.asarray(m)
            assert m.mode == "L" and set(np.unique(arr)) <= {0, 255}
            assert m.size == (info.width, info.height)
        np.testing.assert_array_equal(arr // 255, load_mask(info.case.mask_paths), err_msg=stem)


def test_balancing_touches_train_only(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    before, after = manifest["counts_before_balancing"], manifest["counts_after_balancing"]
    assert len(set(after["train"].values())) == 1, "train classes balanced"
    for s in ("validation", "test"):
        assert before[s] == after[s]
        assert not list((prepared / "classification" / s).rglob(f"*{AUG_MARK}*"))
    added = sum(after["train"].values()) - sum(before["train"].values())
    assert len(list((prepared / "classification" / "train").rglob(f"*{AUG_MARK}*"))) == added > 0
    assert not list((prepared / "segmentation").rglob(f"*{AUG_MARK}*"))


def test_no_balancing(synthetic_release, tmp_path):
    rep = prepare(synthetic_release, tmp_path / "o", PrepareConfig(balance=BalanceConfig("none")))
    assert rep.counts_before_balancing == rep.counts_after_balancing


def test_existing_output_is_refused_then_overwritten_with_the_same_split(synthetic_release, prepared, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(prepared, out)
    with pytest.raises(TfBusError, match="--overwrite"):
        prepare(synthetic_release, out)
    old = json.loads((out / "splits.json").read_text())["cases"]
    from tf_bus.config import SplitConfig

    rep = prepare(synthetic_release, out, PrepareConfig(split=SplitConfig(seed=99)), overwrite=True)
    assert rep.reused_split == str(out / "splits.json")
    assert json.loads((out / "splits.json").read_text())["cases"] == old, "a rerun keeps the split"
    rep = prepare(synthetic_release, out, PrepareConfig(split=SplitConfig(seed=99)), overwrite=True, resplit=True)
    assert rep.reused_split is None
    assert json.loads((out / "splits.json").read_text())["cases"] != old


def test_failed_prepare_leaves_no_output_and_input_untouched(synthetic_release, tmp_path):
    root = tmp_path / "Dataset_BUSI_with_GT"
    shutil.copytree(synthetic_release, root)
    (root / "benign" / "benign (3)_mask_1.png").write_bytes(b"\x89PNG broken")
    before = tree_digest(root)
    with pytest.raises(BusiDataError):
        prepare(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "no temporary left behind"
    rep = prepare(root, tmp_path / "out", PrepareConfig(skip_bad=True))
    assert [p["kind"] for p in rep.problems] == ["unreadable"]
    assert tree_digest(root) == before


def test_output_inside_input_is_refused(synthetic_release, tmp_path):
    root = tmp_path / "Dataset_BUSI_with_GT"
    shutil.copytree(synthetic_release, root)
    with pytest.raises(TfBusError, match="inside the input"):
        prepare(root, root / "prepared")


def test_reused_split_file_must_match(synthetic_release, prepared, tmp_path):
    d = json.loads((prepared / "splits.json").read_text())
    d["cases"].pop(next(iter(d["cases"])))
    (tmp_path / "s.json").write_text(json.dumps(d))
    with pytest.raises(TfBusError, match="does not match"):
        prepare(synthetic_release, tmp_path / "o", splits_file=tmp_path / "s.json")


def test_every_class_in_every_split(prepared):
    counts = json.loads((prepared / "manifest.json").read_text())["counts_before_balancing"]
    for s in SPLITS:
        for c in CLASS_NAMES:
            assert counts[s][c] >= 1, (s, c)


@pytest.mark.parametrize("folder, manifest, want", [
    ("prepared", None, "release"),                      # a prepare output names its release
    ("release", None, None),                            # the raw release has no manifest
    ("other", "{not json", None),                       # unreadable manifest
    ("other", '["a list"]', None),                      # a manifest that is not prepare's
    ("other", '{"counts_before_balancing": {}}', None),  # prepare-like, no source
])
def test_prepared_source(folder, manifest, want, prepared, synthetic_release, tmp_path):
    from tf_bus.data.layouts import prepared_source

    path = {"prepared": prepared, "release": synthetic_release, "other": tmp_path}[folder]
    if manifest is not None:
        (tmp_path / "manifest.json").write_text(manifest)
    assert prepared_source(path) == (synthetic_release.resolve() if want == "release" else None)
