"""Duplicate groups and the leak-free split (stage 2 of the pipeline).

BUSI holds exact duplicates (one image filed under benign and malignant) and many
near-duplicate frames of one lesion. A random split puts frames of one lesion into
train and test and inflates every score. Here images are grouped by exact hash and
near-duplicate thumbnails (union-find), and whole groups are assigned to splits,
stratified by class. The split is written once to ``splits.json`` and reused.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from tf_bus.config import CLASS_NAMES, SPLITS, DuplicateConfig, SplitConfig
from tf_bus.data.busi import CaseInfo, TfBusError
from tf_bus.io import write_json_atomic

SPLITS_VERSION = 1


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _normalise(rows: np.ndarray) -> np.ndarray:
    rows = rows.reshape(len(rows), -1).astype(np.float64)
    rows = rows - rows.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def _high_pass(thumb: np.ndarray, radius: float) -> np.ndarray:
    blurred = np.asarray(Image.fromarray(thumb).filter(ImageFilter.GaussianBlur(radius)), np.float32)
    return thumb.astype(np.float32) - blurred


@dataclass
class DuplicateGroups:
    """Duplicate groups of a release.

    Attributes:
        groups: lists of case ids; every case is in exactly one group (singletons too).
        exact: groups of byte-identical images (pixel hash), size >= 2.
        near_pairs: (case_a, case_b, thumbnail corr, detail corr) of near-duplicates.
    """

    groups: list[list[str]]
    exact: list[list[str]]
    near_pairs: list[tuple[str, str, float, float]]

    def group_of(self) -> dict[str, int]:
        return {cid: g for g, members in enumerate(self.groups) for cid in members}

    @staticmethod
    def _label(case_id: str) -> str:
        return case_id.split("/", 1)[0]

    def cross_class(self) -> list[list[str]]:
        """Groups whose members are filed under more than one class."""
        return [g for g in self.groups if len({self._label(c) for c in g}) > 1]

    def to_dict(self) -> dict[str, Any]:
        multi = [g for g in self.groups if len(g) > 1]
        return {
            "num_cases": sum(len(g) for g in self.groups),
            "num_groups": len(self.groups),
            "num_cases_in_duplicate_groups": sum(len(g) for g in multi),
            "exact_duplicates": self.exact,
            "cross_class_groups": self.cross_class(),
            "groups": multi,
            "near_pairs": [
                {"a": a, "b": b, "thumbnail_corr": round(c, 4), "detail_corr": round(d, 4)}
                for a, b, c, d in self.near_pairs
            ],
        }


def find_duplicates(infos: list[CaseInfo], config: DuplicateConfig | None = None) -> DuplicateGroups:
    """Groups exact and near-duplicate images with union-find.

    Args:
        infos: cases as read by ``read_release``.
        config: thresholds; defaults are calibrated on real BUSI.

    Returns:
        ``DuplicateGroups``, groups sorted by their first case id.
    """
    config = config or DuplicateConfig()
    ids = [i.case.case_id for i in infos]
    n = len(ids)
    uf = _UnionFind(n)
    by_hash: dict[str, list[int]] = collections.defaultdict(list)
    for k, info in enumerate(infos):
        by_hash[info.sha256].append(k)
    exact = []
    for members in by_hash.values():
        for k in members[1:]:
            uf.union(members[0], k)
        if len(members) > 1:
            exact.append([ids[k] for k in members])
    near_pairs: list[tuple[str, str, float, float]] = []
    if n > 1:
        thumbs = np.stack([
            np.asarray(Image.fromarray(i.thumbnail).resize((config.thumb_size,) * 2, Image.BILINEAR))
            if i.thumbnail.shape[0] != config.thumb_size else i.thumbnail
            for i in infos
        ])
        plain = _normalise(thumbs)
        detail = _normalise(np.stack([_high_pass(t, config.detail_blur) for t in thumbs]))
        corr = plain @ plain.T
        dcorr = detail @ detail.T
        hits = np.argwhere(np.triu((corr >= config.near_threshold) & (dcorr >= config.detail_threshold), 1))
        for a, b in hits:
            uf.union(int(a), int(b))
            near_pairs.append((ids[a], ids[b], float(corr[a, b]), float(dcorr[a, b])))
    grouped: dict[int, list[str]] = collections.defaultdict(list)
    for k in range(n):
        grouped[uf.find(k)].append(ids[k])
    groups = sorted(grouped.values(), key=lambda g: g[0])
    return DuplicateGroups(groups=groups, exact=exact, near_pairs=near_pairs)


def _group_label(members: list[str]) -> str:
    """The class a group is stratified under: its most frequent, ties by class order."""
    counts = collections.Counter(m.split("/", 1)[0] for m in members)
    return max(CLASS_NAMES, key=lambda c: (counts.get(c, 0), -CLASS_NAMES.index(c)))


def _assign_stratified(groups: list[list[str]], targets: dict[str, float], seed: int) -> dict[str, str]:
    """Whole groups to the bins of ``targets`` ({bin: fraction}), stratified by class.

    Within each class, groups are shuffled with ``seed``, then placed largest first into
    the bin whose case count is furthest below its target; ties go to the bin listed first.
    """
    rng = random.Random(seed)
    names = list(targets)
    by_class: dict[str, list[list[str]]] = collections.defaultdict(list)
    for g in sorted(groups, key=lambda g: sorted(g)[0]):
        by_class[_group_label(g)].append(sorted(g))
    assignment: dict[str, str] = {}
    for label in CLASS_NAMES:
        class_groups = by_class.get(label, [])
        rng.shuffle(class_groups)
        class_groups.sort(key=len, reverse=True)  # stable: shuffled order within a size
        total = sum(len(g) for g in class_groups)
        placed = {s: 0 for s in names}
        for g in class_groups:
            chosen = max((s for s in names if targets[s] > 0),
                         key=lambda s: (targets[s] * total - placed[s], -names.index(s)))
            placed[chosen] += len(g)
            for cid in g:
                assignment[cid] = chosen
    return assignment


def assign_splits(groups: list[list[str]], config: SplitConfig | None = None) -> dict[str, str]:
    """Assigns whole duplicate groups to splits, stratified by class.

    Within each class, groups are shuffled with ``config.seed``, then placed largest
    first into the split whose case count is furthest below its target (ties: train,
    then validation, then test). Deterministic for a given seed and set of groups.

    Returns:
        ``{case_id: split}`` for every case of every group.
    """
    config = config or SplitConfig()
    return _assign_stratified(groups, config.fractions(), config.seed)


@dataclass
class SplitPlan:
    """What ``splits.json`` holds."""

    assignment: dict[str, str]
    config: SplitConfig
    duplicates: DuplicateGroups | None = None
    source: str = ""

    def cases_in(self, split: str) -> list[str]:
        return sorted(c for c, s in self.assignment.items() if s == split)

    def counts(self) -> dict[str, dict[str, int]]:
        out = {s: {c: 0 for c in CLASS_NAMES} for s in SPLITS}
        for cid, s in self.assignment.items():
            out[s][cid.split("/", 1)[0]] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": SPLITS_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": self.source,
            "config": {"train": self.config.train, "validation": self.config.validation,
                       "test": self.config.test, "seed": self.config.seed},
            "counts": self.counts(),
            "groups": [g for g in (self.duplicates.groups if self.duplicates else []) if len(g) > 1],
            "cases": dict(sorted(self.assignment.items())),
        }


def make_split(
    infos: list[CaseInfo],
    split_config: SplitConfig | None = None,
    duplicate_config: DuplicateConfig | None = None,
    source: str = "",
) -> SplitPlan:
    """Finds duplicate groups and assigns them to splits (library entry point)."""
    split_config = split_config or SplitConfig()
    dups = find_duplicates(infos, duplicate_config)
    return SplitPlan(assign_splits(dups.groups, split_config), split_config, dups, source)


def cross_validation_plans(plan: SplitPlan, folds: int, *, validation: float | None = None) -> list[SplitPlan]:
    """``folds`` leak-free plans in which every case is in the test split exactly once.

    The duplicate groups of ``plan`` (each case not in one is a group of its own) are
    dealt into ``folds`` class-stratified folds, whole groups at a time, with the plan's
    seed. In plan ``k`` fold ``k`` is the test split; the other folds' groups are split
    again, stratified, into train and a validation split of ``validation`` of all cases
    (default: the plan's validation fraction).

    Raises:
        TfBusError: fewer than 2 folds, more folds than groups in a class, or no room
            left for training.
    """
    validation = plan.config.validation if validation is None else validation
    if folds < 2:
        raise TfBusError(f"cross-validation needs at least 2 folds. Received: folds={folds}")
    grouped = [sorted(g) for g in (plan.duplicates.groups if plan.duplicates else [])]
    seen = {c for g in grouped for c in g}
    groups = grouped + [[c] for c in sorted(plan.assignment) if c not in seen]
    per_class = collections.Counter(_group_label(g) for g in groups)
    short = {c: n for c, n in per_class.items() if n < folds}
    if short:
        raise TfBusError(f"{folds} folds need at least {folds} independent cases per class; "
                         f"{', '.join(f'{c} has {n}' for c, n in sorted(short.items()))}. Use fewer folds.")
    train = 1.0 - 1.0 / folds - validation
    if not 0.0 < train < 1.0 or validation <= 0:
        raise TfBusError(f"with {folds} folds a validation fraction of {validation:g} leaves {train:g} "
                         "of the cases for training. Use fewer folds or a smaller validation fraction.")
    fold_of = _assign_stratified(groups, {f"fold{k}": 1.0 / folds for k in range(folds)}, plan.config.seed)
    plans = []
    for k in range(folds):
        rest = [g for g in groups if fold_of[g[0]] != f"fold{k}"]
        shares = {"train": train / (train + validation), "validation": validation / (train + validation)}
        assignment = _assign_stratified(rest, shares, plan.config.seed + k)
        assignment.update({c: "test" for g in groups if fold_of[g[0]] == f"fold{k}" for c in g})
        config = SplitConfig(train=train, validation=validation, test=1.0 - train - validation, seed=plan.config.seed)
        plans.append(SplitPlan(dict(sorted(assignment.items())), config, plan.duplicates, plan.source))
    return plans


def save_splits(plan: SplitPlan, path: str | os.PathLike) -> None:
    write_json_atomic(path, plan.to_dict())


def load_splits(path: str | os.PathLike) -> SplitPlan:
    """Reads a ``splits.json``.

    Raises:
        TfBusError: naming the file when it is missing, not JSON, or malformed.
    """
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise TfBusError(f"{p}: no such split file. Run `tf-bus prepare` to write one.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TfBusError(f"{p}: not valid JSON ({e}). Delete it to write a new split.") from None
    if not isinstance(d, dict) or not isinstance(d.get("cases"), dict):
        raise TfBusError(f"{p}: missing the 'cases' mapping. Delete it to write a new split.")
    bad = {s for s in d["cases"].values() if s not in SPLITS}
    if bad:
        raise TfBusError(
            f"{p}: unknown split name(s) {sorted(bad)}; expected {', '.join(SPLITS)}."
        )
    cfg = d.get("config", {})
    config = SplitConfig(**{k: cfg[k] for k in ("train", "validation", "test", "seed") if k in cfg})
    groups = d.get("groups", [])
    dups = DuplicateGroups(groups=groups, exact=[], near_pairs=[]) if groups else None
    return SplitPlan(dict(d["cases"]), config, dups, d.get("source", ""))


def check_plan_matches(plan: SplitPlan, case_ids: list[str], path: str) -> None:
    """Raises when a saved split does not cover exactly the cases found now."""
    have, want = set(plan.assignment), set(case_ids)
    if have != want:
        missing = sorted(want - have)[:5]
        extra = sorted(have - want)[:5]
        raise TfBusError(
            f"{path}: the saved split does not match the data: "
            f"{len(want - have)} case(s) not in it (e.g. {missing}), "
            f"{len(have - want)} case(s) no longer in the data (e.g. {extra}). "
            "Pass --resplit to make a new split (scores are then not comparable with "
            "runs on the old one)."
        )
