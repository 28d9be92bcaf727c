"""K-fold cross-validation: the fold plans (pure), and both trainers' --folds end to end."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import CV_SEGMENTER_FLAGS, cli
from tf_bus.config import SplitConfig
from tf_bus.data.busi import TfBusError
from tf_bus.data.split import DuplicateGroups, SplitPlan, cross_validation_plans


def _plan(per_class: dict[str, int], groups: list[list[str]], seed: int = 1337) -> SplitPlan:
    cases = [f"{c}/{c} ({i})" for c, n in per_class.items() for i in range(n)]
    dups = DuplicateGroups(groups=groups, exact=[], near_pairs=[])
    return SplitPlan({c: "train" for c in cases}, SplitConfig(seed=seed), dups)


PLANS = [  # per class, duplicate groups, folds, validation share
    ({"benign": 40, "malignant": 20, "normal": 12}, [], 5, 0.10),
    ({"benign": 40, "malignant": 20, "normal": 12},
     [["benign/benign (0)", "benign/benign (1)", "benign/benign (2)"], ["malignant/malignant (3)", "benign/benign (7)"],
      ["normal/normal (0)", "normal/normal (1)"]], 3, 0.15),
    ({"benign": 9, "malignant": 6, "normal": 4}, [["benign/benign (0)", "benign/benign (1)"]], 2, 0.10),
]


@pytest.mark.parametrize("per_class,groups,folds,validation", PLANS)
def test_every_case_is_tested_once_and_groups_stay_whole(per_class, groups, folds, validation):
    plans = cross_validation_plans(_plan(per_class, groups), folds, validation=validation)
    assert len(plans) == folds
    total = sum(per_class.values())
    tested = collections.Counter(c for p in plans for c in p.cases_in("test"))
    assert set(tested) == set(plans[0].assignment) and set(tested.values()) == {1}
    for p in plans:
        assert len(p.assignment) == total
        for g in groups:
            assert len({p.assignment[c] for c in g}) == 1, f"group {g} split across {p.counts()}"
        counts = p.counts()
        for cls, n in per_class.items():  # stratified: each class's test share near 1/folds
            assert abs(counts["test"][cls] - n / folds) <= 3, counts
        assert abs(len(p.cases_in("validation")) - validation * total) <= 4, counts
        assert len(p.cases_in("train")) > len(p.cases_in("validation"))
    again = cross_validation_plans(_plan(per_class, groups), folds, validation=validation)
    assert [p.assignment for p in again] == [p.assignment for p in plans], "deterministic for a seed"
    other = cross_validation_plans(_plan(per_class, groups, seed=7), folds, validation=validation)
    assert [p.assignment for p in other] != [p.assignment for p in plans], "the seed deals the folds"


@pytest.mark.parametrize("folds,validation,message", [
    (1, 0.1, "at least 2 folds"),
    (5, 0.1, "5 folds need at least 5 independent cases per class; normal has 4"),
    (2, 0.5, "leaves 0 of the cases for training"),
    (3, 0.0, "validation fraction of 0"),
])
def test_impossible_folds_are_refused(folds, validation, message):
    with pytest.raises(TfBusError, match=message):
        cross_validation_plans(_plan({"benign": 9, "malignant": 6, "normal": 4}, []), folds, validation=validation)


# ------------------------------------------------------------------------ end to end (slow)



@pytest.mark.slow
def test_segmenter_folds_pool_every_case_and_resume(two_cvs, synthetic_release, tmp_path):
    """The shared 2-fold U-Net CV (`train-segmenter --folds 2`, conftest), copied, then resumed
    and overwritten."""
    from tf_bus.evaluation import aggregate_mask_metrics

    cv = tmp_path / "cv"
    shutil.copytree(two_cvs[0], cv)
    result = json.loads((cv / "cross_validation.json").read_text())
    names = [p["name"] for p in result["per_image"]]
    assert len(names) == len(set(names)) == 36, "each synthetic case scored once"
    for k in range(2):
        test = {c.split("/", 1)[1] for c in SplitPlan.cases_in(_load(cv / f"fold_{k}" / "splits.json"), "test")}
        assert {p["name"] for p in result["per_image"] if p["fold"] == k} == test
    assert result["pooled"] == json.loads(json.dumps(aggregate_mask_metrics(result["per_image"])))
    lesion = [p["dice"] for p in result["per_image"] if p["lesion"]]
    assert result["pooled"]["lesion_images"]["dice"]["mean"] == pytest.approx(np.mean(lesion))
    assert result["fold_mean"]["dice"] == pytest.approx(np.mean([f["dice"] for f in result["folds"]]))
    assert all(0.0 <= f["threshold"] <= 1.0 for f in result["folds"])

    best = [(cv / f"fold_{k}" / "best.keras").stat().st_mtime_ns for k in range(2)]
    (cv / "fold_1" / "eval_test" / "metrics.json").unlink()  # killed after fold 1 trained, before it was scored
    r = cli("train-segmenter", "--data", synthetic_release, "--out", cv, "--folds", "2", *CV_SEGMENTER_FLAGS)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fold 1 of 2" not in r.stdout and "fold 2 of 2" not in r.stdout, "finished folds are not trained again"
    assert [(cv / f"fold_{k}" / "best.keras").stat().st_mtime_ns for k in range(2)] == best
    assert (cv / "fold_1" / "eval_test" / "metrics.json").exists()
    again = {p["name"]: p for p in json.loads((cv / "cross_validation.json").read_text())["per_image"]}
    assert sorted(again) == sorted(names)
    for p in result["per_image"]:  # fold 1 scored again: the same scores
        assert again[p["name"]]["fold"] == p["fold"] and again[p["name"]]["dice"] == pytest.approx(p["dice"], abs=1e-6)

    tiny = [*CV_SEGMENTER_FLAGS[:CV_SEGMENTER_FLAGS.index("--epochs") + 1], "1",
            *CV_SEGMENTER_FLAGS[CV_SEGMENTER_FLAGS.index("--epochs") + 2:]]
    r = cli("train-segmenter", "--data", synthetic_release, "--out", cv, "--folds", "2", *tiny, "--seed", "5")
    assert r.returncode == 2 and "holds a cross-validation with other settings" in r.stderr
    assert "config.epochs: 2 in it, 1 now" in r.stderr and "config.seed: 1337 in it, 5 now" in r.stderr, r.stderr
    r = cli("train-segmenter", "--data", synthetic_release, "--out", cv, "--folds", "2", *tiny, "--seed", "5",
             "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert all((cv / f"fold_{k}" / "best.keras").stat().st_mtime_ns != best[k] for k in range(2)), "trained again"
    assert json.loads((cv / "config.json").read_text())["config"]["seed"] == 5


def _load(path):
    from tf_bus.data.split import load_splits

    return load_splits(path)


@pytest.mark.slow
def test_classifier_folds_pool_the_probabilities(two_cvs):
    """The shared 2-fold ResNet CV (``cross_validate``, conftest)."""
    from tf_bus.evaluation import classification_metrics

    result = json.loads((two_cvs[1] / "cross_validation.json").read_text())
    per = result["per_image"]
    assert len(per) == 36 and {p["fold"] for p in per} == {0, 1}
    pooled = classification_metrics([p["label"] for p in per], [p["probabilities"] for p in per])
    assert result["pooled"]["accuracy"] == pytest.approx(pooled["accuracy"])
    assert np.sum(result["pooled"]["confusion_matrix"]) == 36
    assert result["fold_mean"]["accuracy"] == pytest.approx(np.mean([f["accuracy"] for f in result["folds"]]))


def test_a_prepared_folder_gives_its_release_and_the_same_folds(synthetic_release, prepared):
    """`--data` may be a `tf-bus prepare` output: its source release and its splits.json,
    so the folds are those of the release itself."""
    from tf_bus.training.cross_validation import _release_and_plan

    release, plan = _release_and_plan(prepared, None)
    assert Path(release).resolve() == synthetic_release.resolve()
    assert plan.assignment == _release_and_plan(synthetic_release, None)[1].assignment
    folds = [p.assignment for p in cross_validation_plans(plan, 2, validation=0.10)]
    assert folds == [p.assignment for p in cross_validation_plans(_release_and_plan(synthetic_release, None)[1], 2,
                                                                  validation=0.10)]


def test_folds_need_a_release_not_a_split_layout(prepared, tmp_path):
    from tf_bus.config import SegmenterConfig
    from tf_bus.training.cross_validation import cross_validate

    with pytest.raises(TfBusError, match="must be a raw BUSI release"):
        cross_validate("segmenter", prepared / "segmentation", tmp_path / "cv", SegmenterConfig(), folds=2)
