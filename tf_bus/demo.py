"""`tf-bus demo`: the pipeline end to end on synthetic data or a real BUSI release.

(synthetic data) -> prepare (split + both layouts) -> EDA -> one batch from each loader
(classification layout, segmentation layout, raw release) -> a PNG preview of a training
batch with its masks -> brief training of the U-Net and the ResNet50 classifier ->
export both for TF Serving -> `tf-bus serve` on loopback, queried over REST and gRPC ->
server stopped. ``train=False`` stops after the preview.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tf_bus.config import CLASS_NAMES, LoaderConfig, PrepareConfig


def _preview(images: np.ndarray, masks: np.ndarray, names: list[str], path: Path) -> None:
    from tf_bus.plots import save_png, subplots

    n = len(images)
    fig, axes = subplots(1, n, figsize=(2.4 * n, 2.8))
    for ax, img, m, name in zip(np.atleast_1d(axes), images, masks, names):
        ax.imshow(img.squeeze(), cmap="gray", vmin=0, vmax=1)
        if m.max() > 0:
            ax.contour(m.squeeze(), levels=[0.5], colors="lime", linewidths=1)
        ax.set_title(name, fontsize=7)
        ax.axis("off")
    save_png(fig, path, dpi=100)


def run_demo(data: str | None = None, out_dir: str = "demo_output", *, n_synthetic: int = 60, train: bool = True,
             log=print) -> dict:
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
        log(f"[1/9] synthetic BUSI-like release ({n_synthetic} cases) -> {raw}")
    else:
        raw = Path(data)
        log(f"[1/9] using the BUSI release at {raw}")
    written["release"] = str(raw)

    prepared = out / "prepared"
    report = prepare(raw, prepared, PrepareConfig(), overwrite=True, resplit=True)
    c = report.counts_before_balancing
    log(f"[2/9] prepare: leak-free split by duplicate group ({report.num_duplicate_groups} groups "
        f"of near-duplicates, {len(report.cross_class_groups)} filed under two classes)")
    for s in c:
        after = report.counts_after_balancing[s]
        log(f"      {s:<10} " + "  ".join(f"{k}={c[s][k]}" + (f"(+{after[k] - c[s][k]} aug)" if after[k] > c[s][k] else "")
                                          for k in CLASS_NAMES))
    log(f"      layouts -> {prepared}/classification, {prepared}/segmentation; split -> {prepared}/splits.json")
    written["prepared"] = str(prepared)

    eda_dir = prepared / "eda"
    stats = eda(prepared, eda_dir)
    log(f"[3/9] EDA: image heights median {stats['image_height']['median']:.0f}px, lesion area median "
        f"benign {100 * stats['lesion_area_fraction']['benign'].get('median', 0):.1f}% / malignant "
        f"{100 * stats['lesion_area_fraction']['malignant'].get('median', 0):.1f}% -> {eda_dir}")
    written["eda"] = str(eda_dir)

    cfg = LoaderConfig(image_size=(128, 128), batch_size=6)
    log("[4/9] one batch from each tf.data loader:")
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
    log(f"[5/9] augmented training batch with mask outlines -> {preview}")
    written["preview"] = str(preview)
    if train:
        written.update(_train_export_serve(prepared, out, log))
    log(f"done in {time.perf_counter() - t0:.1f}s; outputs under {out}")
    return written


def _train_export_serve(prepared: Path, out: Path, log) -> dict:
    from tf_bus.config import ClassifierConfig, SegmenterConfig
    from tf_bus.export import export_run
    from tf_bus.serving.client import GrpcClient, RestClient
    from tf_bus.serving.server import serve_on_loopback
    from tf_bus.training.classification import train_classifier
    from tf_bus.training.segmentation import train_segmenter

    runs, models = out / "runs", out / "models"
    seg = SegmenterConfig(image_size=(64, 64), depth=3, base_filters=8, epochs=2, batch_size=8, warmup_epochs=0,
                          time_budget_minutes=0)
    s = train_segmenter(prepared, runs / "unet", seg, overwrite=True, verbose=0)
    log(f"[6/9] U-Net, 2 epochs at 64 px: best validation Dice {s['best_val_dice']:.3f} -> {runs / 'unet'}")
    cls = ClassifierConfig(image_size=(64, 64), epochs=1, batch_size=8, warmup_epochs=0, time_budget_minutes=0)
    s = train_classifier(prepared, runs / "resnet50", cls, overwrite=True, verbose=0)
    log(f"      ResNet50 from scratch, 1 epoch at 64 px: validation macro-F1 {s['best_val_f1']:.3f} -> {runs / 'resnet50'}")
    if models.exists():
        import shutil

        shutil.rmtree(models)
    for run, name in ((runs / "unet", "busi_segmenter"), (runs / "resnet50", "busi_classifier")):
        info = export_run(run, models, name)
    log(f"[7/9] exported for TensorFlow Serving -> {models}/busi_segmenter/1, {models}/busi_classifier/1 ({info['signatures']})")

    server = serve_on_loopback(models, ("busi_segmenter", "busi_classifier"), out / "models.config")
    try:
        log(f"[8/9] tf-bus serve: gRPC 127.0.0.1:{server.grpc_port}, REST 127.0.0.1:{server.rest_port}")
        image = next((prepared / "segmentation" / "test_images" / "test").glob("*.png"))
        png = image.read_bytes()
        import base64

        rest = RestClient(f"127.0.0.1:{server.rest_port}")
        r = rest.predict("busi_classifier", instances=[{"b64": base64.b64encode(png).decode()}])["predictions"][0]
        log(f"      REST POST /v1/models/busi_classifier:predict ({image.name}) -> {r['class_names']} "
            f"{[round(p, 3) for p in r['probabilities']]}")
        r = rest.predict("busi_segmenter", instances=[{"b64": base64.b64encode(png).decode()}])["predictions"][0]
        log(f"      REST POST /v1/models/busi_segmenter:predict -> lesion area {r['lesion_area_fraction']:.3f}, "
            f"mask PNG {len(base64.b64decode(r['mask_png_bytes']['b64']))} bytes")
        arr = np.empty(1, dtype=object)
        arr[:] = [png]
        with GrpcClient(f"127.0.0.1:{server.grpc_port}") as g:
            o = g.predict("busi_classifier", {"images": arr})
            log(f"      gRPC PredictionService.Predict busi_classifier -> {o['class_names'][0].decode()} "
                f"{np.round(o['probabilities'][0], 3).tolist()}")
            st = g.status("busi_segmenter")
            log(f"      gRPC ModelService.GetModelStatus busi_segmenter -> version {st.model_version_status[0].version} "
                f"state {st.model_version_status[0].state} (30 = AVAILABLE)")
    finally:
        server.stop()
    log("[9/9] server stopped")
    return {"runs": str(runs), "models": str(models)}
