"""Writing the two folder layouts from a split (stage 3 of the pipeline).

``prepare(raw, out)`` writes, atomically (temporary folder, renamed at the end)::

    OUT/splits.json          the split (reused by later runs)
    OUT/duplicates.json      duplicate groups, cross-class groups flagged
    OUT/manifest.json        counts before/after balancing, config, problems skipped
    OUT/classification/{train,validation,test}/{benign,malignant,normal}/<name>.png
    OUT/segmentation/train_images/train/<name>.png   OUT/segmentation/train_masks/train/<name>_mask.png
    OUT/segmentation/val_images/Val/...              OUT/segmentation/val_masks/Val/...
    OUT/segmentation/test_images/test/...            OUT/segmentation/test_masks/test/...

Masks in the segmentation layout are the union of a case's masks, 8-bit PNG {0, 255}.
Class balancing writes augmented copies into ``classification/train`` only.
"""

from __future__ import annotations

import datetime
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

import tf_bus
from tf_bus.config import CLASS_NAMES, SEGMENTATION_DIRS, SPLITS, PrepareConfig
from tf_bus.data.busi import CaseInfo, TfBusError, load_image, load_mask, read_release
from tf_bus.data.split import (
    SplitPlan,
    assign_splits,
    check_plan_matches,
    find_duplicates,
    load_splits,
)
from tf_bus.io import atomic_directory, write_json_atomic

AUG_MARK = "__aug"


def layout_stem(info_or_case_id: CaseInfo | str) -> str:
    """File stem of a case in both layouts: the release name, prefixed with the class
    when the name does not already start with it (so names never collide)."""
    case_id = info_or_case_id if isinstance(info_or_case_id, str) else info_or_case_id.case.case_id
    label, name = case_id.split("/", 1)
    return name if name.lower().startswith(label) else f"{label}_{name}"


@dataclass
class PrepareReport:
    """What ``prepare`` did."""

    out_dir: str
    counts_before_balancing: dict[str, dict[str, int]]
    counts_after_balancing: dict[str, dict[str, int]]
    num_duplicate_groups: int
    cross_class_groups: list[list[str]]
    problems: list[dict[str, str]] = field(default_factory=list)
    reused_split: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _copy_or_convert(info: CaseInfo, dest_dir: Path, stem: str) -> Path:
    """Copies an 8-bit grey/RGB image file as it is; re-encodes anything else to PNG."""
    src = Path(info.case.image_path)
    if info.image_mode in ("L", "RGB"):
        dest = dest_dir / f"{stem}{src.suffix.lower()}"
        shutil.copyfile(src, dest)
    else:
        dest = dest_dir / f"{stem}.png"
        Image.fromarray(load_image(str(src))).save(dest)
    return dest


def _augment(im: Image.Image, rng: random.Random) -> Image.Image:
    """A mild, label-preserving augmentation for offline class balancing."""
    if rng.random() < 0.5:
        im = ImageOps.mirror(im)
    w, h = im.size
    zoom = rng.uniform(0.9, 1.0)
    cw, ch = int(w * zoom), int(h * zoom)
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    im = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BILINEAR)
    im = im.rotate(rng.uniform(-10, 10), resample=Image.BILINEAR)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.9, 1.1))
    return ImageEnhance.Contrast(im).enhance(rng.uniform(0.9, 1.1))


def balance_train_split(train_dir: Path, seed: int) -> dict[str, int]:
    """Adds augmented copies of minority-class images in ``train_dir/<class>/`` until
    every class has as many images as the largest. Returns the copies added per class."""
    rng = random.Random(seed)
    files = {c: sorted(p for p in (train_dir / c).iterdir() if AUG_MARK not in p.stem)
             for c in CLASS_NAMES if (train_dir / c).is_dir()}
    target = max((len(v) for v in files.values()), default=0)
    added = {}
    for label, paths in files.items():
        need = target - len(paths)
        added[label] = max(need, 0)
        for k in range(max(need, 0)):
            src = paths[k % len(paths)]
            with Image.open(src) as im:
                aug = _augment(im.convert("RGB"), rng)
            aug.save(train_dir / label / f"{src.stem}{AUG_MARK}{k}.png")
    return added


def _count_classification(root: Path) -> dict[str, dict[str, int]]:
    return {s: {c: len(list((root / s / c).glob("*"))) for c in CLASS_NAMES} for s in SPLITS}


def write_layouts(infos: list[CaseInfo], plan: SplitPlan, out: Path) -> None:
    """Writes the classification and segmentation layouts for ``plan`` under ``out``."""
    for s in SPLITS:
        for c in CLASS_NAMES:
            (out / "classification" / s / c).mkdir(parents=True, exist_ok=True)
        img_dir, mask_dir = SEGMENTATION_DIRS[s]
        (out / "segmentation" / img_dir).mkdir(parents=True, exist_ok=True)
        (out / "segmentation" / mask_dir).mkdir(parents=True, exist_ok=True)
    for info in infos:
        cid = info.case.case_id
        split = plan.assignment[cid]
        stem = layout_stem(info)
        _copy_or_convert(info, out / "classification" / split / info.case.label, stem)
        img_dir, mask_dir = SEGMENTATION_DIRS[split]
        _copy_or_convert(info, out / "segmentation" / img_dir, stem)
        mask = load_mask(info.case.mask_paths) * np.uint8(255)
        Image.fromarray(mask, mode="L").save(out / "segmentation" / mask_dir / f"{stem}_mask.png")


def prepared_source(folder) -> Path | None:
    """The raw release a `tf-bus prepare` output was written from (its manifest.json's
    ``source``); None for any other folder."""
    import json

    try:
        source = json.loads((Path(folder) / "manifest.json").read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(source).expanduser().resolve() if source else None


def prepare(
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: PrepareConfig | None = None,
    *,
    overwrite: bool = False,
    splits_file: str | os.PathLike | None = None,
    resplit: bool = False,
) -> PrepareReport:
    """Reads the release, splits it without leakage and writes both layouts.

    Args:
        raw_dir: ``Dataset_BUSI_with_GT`` (or its parent).
        out_dir: output root; refused if it exists, unless ``overwrite``.
        config: the prepare config (split fractions, seed, duplicates, balancing).
        overwrite: replace an existing ``out_dir`` (only once the new one is complete).
            Its ``splits.json`` is reused unless ``resplit``.
        splits_file: reuse this ``splits.json`` instead of computing a split.
        resplit: ignore a ``splits.json`` already in ``out_dir``.

    Returns:
        A ``PrepareReport`` (also saved as ``out_dir/manifest.json``).

    Raises:
        TfBusError: bad data (listing every file), an existing output, a split file
            that does not match the data.
    """
    config = config or PrepareConfig()
    out = Path(out_dir).expanduser().resolve()
    raw_root = Path(raw_dir).expanduser().resolve()
    if out.exists() and not overwrite:
        raise TfBusError(f"{out}: already exists. Pass --overwrite to replace it (its splits.json is reused).")
    if out == raw_root or raw_root in out.parents:
        raise TfBusError(f"{out}: is inside the input {raw_root}. Write the output elsewhere; the input is never modified.")
    read = read_release(raw_root, skip_bad=config.skip_bad,
                        thumb_size=config.duplicates.thumb_size, workers=config.workers)
    case_ids = [i.case.case_id for i in read.infos]
    reuse = Path(splits_file) if splits_file else None
    if reuse is None and overwrite and not resplit and (out / "splits.json").exists():
        reuse = out / "splits.json"
    dups = find_duplicates(read.infos, config.duplicates)
    if reuse is not None:
        plan = load_splits(reuse)
        check_plan_matches(plan, case_ids, str(reuse))
        plan.duplicates = dups
        # A reused split must still keep every duplicate group within one split.
        for g in dups.groups:
            if len({plan.assignment[c] for c in g}) > 1:
                raise TfBusError(
                    f"{reuse}: duplicate group {g} straddles splits; pass --resplit to make a leak-free split."
                )
    else:
        plan = SplitPlan(assign_splits(dups.groups, config.split), config.split, dups, str(raw_root))
    plan.source = str(raw_root)
    try:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            write_layouts(read.infos, plan, tmp)
            before = _count_classification(tmp / "classification")
            if config.balance.method == "augment":
                balance_train_split(tmp / "classification" / "train", config.balance.seed)
            after = _count_classification(tmp / "classification")
            report = PrepareReport(
                out_dir=str(out),
                counts_before_balancing=before,
                counts_after_balancing=after,
                num_duplicate_groups=sum(1 for g in dups.groups if len(g) > 1),
                cross_class_groups=dups.cross_class(),
                problems=[p.to_dict() for p in read.problems],
                reused_split=str(reuse) if reuse else None,
            )
            write_json_atomic(tmp / "splits.json", plan.to_dict())
            write_json_atomic(tmp / "duplicates.json", dups.to_dict())
            write_json_atomic(tmp / "manifest.json", {
                "tf_bus_version": tf_bus.__version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "source": str(raw_root),
                "config": config.to_dict(),
                **report.to_dict(),
            })
    except FileExistsError:
        raise TfBusError(f"{out}: appeared while preparing. Pass --overwrite to replace it.") from None
    return report

