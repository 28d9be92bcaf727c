"""`tf-bus demo`: the pipeline end to end on synthetic data or a real BUSI release.

Data stage so far: (synthetic data) -> prepare (split + both layouts) -> EDA -> one
batch from each loader (classification layout, segmentation layout, raw release) ->
a PNG preview of a training batch with its masks.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from tf_bus.config import CLASS_NAMES, LoaderConfig, PrepareConfig


def _preview(images: np.ndarray, masks: np.ndarray, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(2.4 * n, 2.8), constrained_layout=True)
    for ax, img, m, name in zip(np.atleast_1d(axes), images, masks, names):
        ax.imshow(img.squeeze(), cmap="gray", vmin=0, vmax=1)
        if m.max() > 0:
            ax.contour(m.squeeze(), levels=[0.5], colors="lime", linewidths=1)
        ax.set_title(name, fontsize=7)
        ax.axis("off")
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def run_demo(data: str | None = None, out_dir: str = "demo_output", *, n_synthetic: int = 60, log=print) -> dict:
    """Runs the demo; returns a dict of what was written where."""
    from tf_bus.data.eda import eda
    from tf_bus.data.layouts import prepare
    from tf_bus.data.pipeline import classification_dataset, segmentation_dataset
    from tf_bus.data.synthetic import make_synthetic

    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    t0 = time.perf_counter()
    if data is None:
        raw = make_synthetic(out / "synthetic", n=n_synthetic, seed=0, overwrite=True)
        log(f"[1/5] synthetic BUSI-like release ({n_synthetic} cases) -> {raw}")
    else:
        raw = Path(data)
        log(f"[1/5] using the BUSI release at {raw}")
    written["release"] = str(raw)

    prepared = out / "prepared"
    report = prepare(raw, prepared, PrepareConfig(), overwrite=True, resplit=True)
    c = report.counts_before_balancing
    log(f"[2/5] prepare: leak-free split by duplicate group ({report.num_duplicate_groups} groups "
        f"of near-duplicates, {len(report.cross_class_groups)} filed under two classes)")
    for s in c:
        after = report.counts_after_balancing[s]
        log(f"      {s:<10} " + "  ".join(f"{k}={c[s][k]}" + (f"(+{after[k] - c[s][k]} aug)" if after[k] > c[s][k] else "")
                                          for k in CLASS_NAMES))
    log(f"      layouts -> {prepared}/classification, {prepared}/segmentation; split -> {prepared}/splits.json")
    written["prepared"] = str(prepared)

    eda_dir = prepared / "eda"
    stats = eda(prepared, eda_dir)
    log(f"[3/5] EDA: image heights median {stats['image_height']['median']:.0f}px, lesion area median "
        f"benign {100 * stats['lesion_area_fraction']['benign'].get('median', 0):.1f}% / malignant "
        f"{100 * stats['lesion_area_fraction']['malignant'].get('median', 0):.1f}% -> {eda_dir}")
    written["eda"] = str(eda_dir)

    cfg = LoaderConfig(image_size=(128, 128), batch_size=6)
    log("[4/5] one batch from each tf.data loader:")
    x, y = next(iter(classification_dataset(prepared / "classification", "train", cfg)))
    log(f"      classification layout: images {tuple(x.shape)} {x.dtype.name}, labels {y.numpy().tolist()}")
    x, m = next(iter(segmentation_dataset(prepared / "segmentation", "train", cfg)))
    log(f"      segmentation layout:   images {tuple(x.shape)}, masks {tuple(m.shape)} values {sorted(set(np.unique(m.numpy()).tolist()))}")
    x, m, names = next(iter(segmentation_dataset(raw, "validation", cfg, include_names=True,
                                                 splits_file=prepared / "splits.json")))
    log(f"      raw release:           images {tuple(x.shape)}, masks {tuple(m.shape)} (masks united on the fly)")

    preview = out / "batch_preview.png"
    xs, ms, ns = next(iter(segmentation_dataset(prepared, "train", cfg, include_names=True)))
    _preview(xs.numpy(), ms.numpy(), [n.decode() for n in ns.numpy()], preview)
    log(f"[5/5] augmented training batch with mask outlines -> {preview}")
    written["preview"] = str(preview)
    log(f"done in {time.perf_counter() - t0:.1f}s; outputs under {out}")
    return written
