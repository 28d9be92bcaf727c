"""Exploratory data analysis: class counts, image sizes, lesion areas (JSON + PNG)."""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tf_bus.config import CLASS_NAMES, SPLITS
from tf_bus.data.busi import TfBusError, load_mask, read_release
from tf_bus.data.pipeline import detect_layout, list_classification, list_segmentation
from tf_bus.io import write_json_atomic


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    a = np.asarray(values, np.float64)
    return {"count": int(a.size), "min": float(a.min()), "p25": float(np.percentile(a, 25)),
            "median": float(np.median(a)), "p75": float(np.percentile(a, 75)),
            "max": float(a.max()), "mean": float(a.mean())}


def _label_of(stem: str) -> str:
    for c in CLASS_NAMES:
        if stem.lower().startswith(c):
            return c
    return "unknown"


def collect_stats(data: str | os.PathLike) -> dict[str, Any]:
    """Per-split class counts (before/after balancing), image sizes and lesion areas.

    Args:
        data: a ``tf-bus prepare`` output root, or a raw release.
    """
    p = Path(data).expanduser().resolve()
    stats: dict[str, Any] = {"source": str(p)}
    records: list[tuple[str, str, int, int, float]] = []  # split, label, h, w, lesion fraction
    if (p / "classification").is_dir() and (p / "segmentation").is_dir():
        stats["layout"] = "prepared"
        cls_root, seg_root = p / "classification", p / "segmentation"
        before, after = {}, {}
        for s in SPLITS:
            _, lab_orig = list_classification(cls_root, s, include_augmented=False)
            _, lab_all = list_classification(cls_root, s, include_augmented=True)
            before[s] = {c: lab_orig.count(i) for i, c in enumerate(CLASS_NAMES)}
            after[s] = {c: lab_all.count(i) for i, c in enumerate(CLASS_NAMES)}
            images, masks = list_segmentation(seg_root, s)
            for img, msk in zip(images, masks):
                with Image.open(img) as im:
                    w, h = im.size
                records.append((s, _label_of(Path(img).stem), h, w, float(load_mask(msk).mean())))
        stats["class_counts_before_balancing"] = before
        stats["class_counts_after_balancing"] = after
    else:
        kind, root = detect_layout(p, "classification")
        if kind != "release":
            raise TfBusError(f"{p}: EDA reads a `tf-bus prepare` output or a raw release. Received a {kind} layout alone.")
        stats["layout"] = "release"
        read = read_release(root, skip_bad=True)
        counts = {c: 0 for c in CLASS_NAMES}
        for info in read.infos:
            counts[info.case.label] += 1
            records.append(("all", info.case.label, info.height, info.width, info.lesion_fraction))
        stats["class_counts_before_balancing"] = {"all": counts}
        stats["class_counts_after_balancing"] = {"all": counts}
        stats["problems"] = [pr.to_dict() for pr in read.problems]
    stats["image_height"] = _summary([r[2] for r in records])
    stats["image_width"] = _summary([r[3] for r in records])
    stats["lesion_area_fraction"] = {
        c: _summary([r[4] for r in records if r[1] == c]) for c in CLASS_NAMES
    }
    stats["images_with_empty_mask"] = {
        c: sum(1 for r in records if r[1] == c and r[4] == 0.0) for c in CLASS_NAMES
    }
    stats["_records"] = records
    return stats


def _bar_chart(ax, counts: dict[str, dict[str, int]], title: str) -> None:
    splits = list(counts)
    x = np.arange(len(splits))
    width = 0.8 / len(CLASS_NAMES)
    for k, c in enumerate(CLASS_NAMES):
        vals = [counts[s][c] for s in splits]
        bars = ax.bar(x + (k - 1) * width, vals, width, label=c)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, splits)
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend(fontsize=8)


def eda(data: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Writes ``eda.json``, ``class_counts.png``, ``image_sizes.png`` and
    ``lesion_area.png`` into ``out_dir``; returns the statistics."""
    from tf_bus.plots import subplots

    stats = collect_stats(data)
    records = stats.pop("_records")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    fig, axes = subplots(1, 2, figsize=(11, 4))
    _bar_chart(axes[0], stats["class_counts_before_balancing"], "Class counts before balancing")
    _bar_chart(axes[1], stats["class_counts_after_balancing"], "After balancing (train only)")
    _save(fig, out / "class_counts.png")

    fig, ax = subplots(figsize=(5.5, 4.5))
    for c in CLASS_NAMES:
        pts = [(r[3], r[2]) for r in records if r[1] == c]
        if pts:
            ax.scatter(*zip(*pts), s=8, alpha=0.6, label=c)
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title("Image sizes")
    ax.legend(fontsize=8)
    _save(fig, out / "image_sizes.png")

    fig, ax = subplots(figsize=(6, 4))
    for c in ("benign", "malignant"):
        vals = [100 * r[4] for r in records if r[1] == c and r[4] > 0]
        if vals:
            ax.hist(vals, bins=30, alpha=0.6, label=f"{c} (median {statistics.median(vals):.1f}%)")
    ax.set_xlabel("lesion area, % of image")
    ax.set_ylabel("images")
    ax.set_title("Lesion sizes")
    ax.legend(fontsize=8)
    _save(fig, out / "lesion_area.png")

    write_json_atomic(out / "eda.json", stats)
    return stats


def _save(fig, path: Path) -> None:
    from tf_bus.plots import save_png

    save_png(fig, path, dpi=110)
