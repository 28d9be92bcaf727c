"""Duplicate grouping and the group-aware, stratified split."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tf_bus.config import ConfigError, SplitConfig
from tf_bus.data.busi import TfBusError, read_release
from tf_bus.data.split import (
    assign_splits,
    check_plan_matches,
    find_duplicates,
    load_splits,
    make_split,
    save_splits,
)


def test_synthetic_near_duplicate_pair_is_grouped(synthetic_release):
    dups = find_duplicates(read_release(synthetic_release).infos)
    assert ["benign/benign (1)", "benign/benign (2)"] in dups.groups
    assert dups.near_pairs and not dups.exact
    assert sum(len(g) for g in dups.groups) == 36


def test_exact_duplicate_across_classes_is_flagged(synthetic_release, tmp_path):
    root = tmp_path / "Dataset_BUSI_with_GT"
    shutil.copytree(synthetic_release, root)
    # The same pixels filed under malignant, saved in another encoding (grey vs RGB).
    Image.open(root / "benign" / "benign (5).png").convert("L").save(root / "malignant" / "malignant (99).png")
    shutil.copy(root / "benign" / "benign (5)_mask.png", root / "malignant" / "malignant (99)_mask.png")
    dups = find_duplicates(read_release(root).infos)
    assert ["benign/benign (5)", "malignant/malignant (99)"] in dups.exact
    assert any(set(g) >= {"benign/benign (5)", "malignant/malignant (99)"} for g in dups.cross_class())
    plan = make_split(read_release(root).infos)
    assert plan.assignment["benign/benign (5)"] == plan.assignment["malignant/malignant (99)"]


def _groups(n_per_class, group_size):
    groups = []
    for label, n in n_per_class.items():
        ids = [f"{label}/{label} ({i})" for i in range(n)]
        groups += [ids[i:i + group_size] for i in range(0, n, group_size)]
    return groups


SPLIT_CASES = [
    # (cases per class, group size, config, expected train/val/test share tolerance)
    ({"benign": 100, "malignant": 50, "normal": 30}, 1, SplitConfig(), 0.02),
    ({"benign": 100, "malignant": 50, "normal": 30}, 3, SplitConfig(), 0.05),
    ({"benign": 60, "malignant": 60, "normal": 60}, 2, SplitConfig(0.8, 0.1, 0.1, seed=5), 0.04),
]


@pytest.mark.parametrize("sizes,group_size,config,tol", SPLIT_CASES)
def test_split_is_stratified_grouped_and_deterministic(sizes, group_size, config, tol):
    groups = _groups(sizes, group_size)
    a = assign_splits(groups, config)
    assert a == assign_splits(list(reversed(groups)), config), "independent of input order"
    for g in groups:
        assert len({a[c] for c in g}) == 1, "no group straddles two splits"
    for label, n in sizes.items():
        for split, frac in config.fractions().items():
            share = sum(1 for c, s in a.items() if s == split and c.startswith(label)) / n
            # One group more or less is the finest granularity a grouped split has.
            assert abs(share - frac) <= max(tol, group_size / n) + 1e-9, (label, split, share)


def test_another_seed_gives_another_split():
    groups = _groups({"benign": 50, "malignant": 20, "normal": 20}, 1)
    assert assign_splits(groups, SplitConfig(seed=1)) != assign_splits(groups, SplitConfig(seed=2))


ILL_SPLITS = [dict(train=0.8, validation=0.15, test=0.15), dict(train=-0.1, validation=0.6, test=0.5)]


@pytest.mark.parametrize("kwargs", ILL_SPLITS)
def test_bad_fractions_raise(kwargs):
    with pytest.raises(ConfigError, match="Received"):
        SplitConfig(**kwargs)


def test_splits_json_round_trip_and_mismatch(synthetic_release, tmp_path):
    infos = read_release(synthetic_release).infos
    plan = make_split(infos)
    save_splits(plan, tmp_path / "splits.json")
    again = load_splits(tmp_path / "splits.json")
    assert again.assignment == plan.assignment
    check_plan_matches(again, [i.case.case_id for i in infos], "splits.json")
    with pytest.raises(TfBusError, match="--resplit"):
        check_plan_matches(again, [i.case.case_id for i in infos][1:] + ["benign/new"], "splits.json")


BAD_SPLIT_FILES = [
    ("{not json", "not valid JSON"),
    (json.dumps({"version": 1}), "missing the 'cases'"),
    (json.dumps({"cases": {"benign/a": "training"}}), "unknown split name"),
]


@pytest.mark.parametrize("content,message", BAD_SPLIT_FILES)
def test_bad_split_files_are_named(content, message, tmp_path):
    p = tmp_path / "splits.json"
    p.write_text(content)
    with pytest.raises(TfBusError, match=message) as err:
        load_splits(p)
    assert str(p) in str(err.value)


def test_unrelated_images_are_not_grouped():
    """Two different speckle images must not pass the near-duplicate test."""
    from tf_bus.data.busi import Case, CaseInfo

    rng = np.random.default_rng(0)
    infos = []
    for k in range(2):
        t = (rng.random((32, 32)) * 255).astype(np.uint8)
        infos.append(CaseInfo(Case(f"benign/b{k}", "benign", "", ("",)), 32, 32, "L", ("L",), str(k), t, 0.1, 1))
    assert all(len(g) == 1 for g in find_duplicates(infos).groups)
