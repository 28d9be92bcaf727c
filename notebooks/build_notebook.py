"""Writes notebooks/busi_pipeline.ipynb from the cells below (no outputs stored).

Edit the cells here, run ``python notebooks/build_notebook.py``, commit both files;
``tests/test_notebook.py`` checks the two agree and executes the notebook.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = HERE / "busi_pipeline.ipynb"

CELLS: list[tuple[str, str]] = [
    ("md", """# Breast ultrasound lesions with tf-bus: from the BUSI release to TensorFlow Serving

**Description:** read the BUSI release, split it without leakage, train a U-Net to
outline lesions and a ResNet to classify them, evaluate both honestly, export them for
TensorFlow Serving, query them over REST and gRPC, and tune the classifier with
KerasTuner.

Every stage is a `tf_bus` library function with a thin `tf-bus` command over it; this
notebook calls the functions, and each section names the command that does the same.
Nothing here needs a GPU or the internet."""),
    ("md", """## Parameters

`DATA_DIR` is a `Dataset_BUSI_with_GT` folder (or its parent). Leave it `None` to make a
small synthetic BUSI-like release, so that the notebook runs anywhere. `FAST = True`
keeps every cell to seconds on a 2-core CPU (tiny images, one or two epochs): the numbers
it prints show the mechanics, not a trained model. Set `FAST = False` with the real data
for a longer, meaningful run, or use the `tf-bus` commands in the README for full training."""),
    ("code", """# Parameters (papermill-style: override these when running the notebook headless).
DATA_DIR = None  # e.g. "../../shared/busi/Dataset_BUSI_with_GT"
FAST = True
WORK_DIR = "busi_notebook_output\""""),
    ("code", """import base64
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, Markdown, display
from PIL import Image as PILImage

import tf_bus  # before TensorFlow: it turns on oneDNN's CPU kernels (README, "oneDNN")
import keras
import tensorflow as tf

tf.get_logger().setLevel("ERROR")  # keep the cells' output to what tf-bus prints

work = Path(WORK_DIR).resolve()
if work.exists():
    shutil.rmtree(work)
work.mkdir(parents=True)
keras.utils.set_random_seed(0)
print("tf-bus", tf_bus.__version__, "| keras", keras.__version__, "| outputs under", work)"""),
    ("md", """## 1. The BUSI release

The release is `Dataset_BUSI_with_GT/<benign|malignant|normal>/<name>.png` with
`<name>_mask.png` and sometimes `<name>_mask_1.png`, ... when an image shows more than
one lesion. `read_release` (the `tf-bus check` command) reads every file, unites each
case's masks, and reports bad files with the fix instead of failing half-way."""),
    ("code", """from tf_bus.data.busi import load_image, load_mask, read_release
from tf_bus.data.synthetic import make_synthetic

if DATA_DIR is None:
    raw = make_synthetic(work / "synthetic", n=36 if FAST else 90, seed=0)
    print("synthetic release:", raw)
else:
    raw = Path(DATA_DIR)
read = read_release(raw)
by_class = {c: sum(i.case.label == c for i in read.infos) for c in ("benign", "malignant", "normal")}
print(len(read.infos), "cases:", by_class, "| problems:", len(read.problems))"""),
    ("code", """picks = [next(i for i in read.infos if i.case.label == c) for c in ("benign", "malignant", "normal")]
picks.append(max(read.infos, key=lambda i: i.lesion_components))  # one with several masks
fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3))
for ax, info in zip(axes, picks):
    ax.imshow(load_image(info.case.image_path), cmap="gray")
    mask = load_mask(info.case.mask_paths)
    if mask.any():
        ax.contour(mask, levels=[0.5], colors="lime", linewidths=1)
    ax.set_title(f"{info.case.case_id}\\n{info.lesion_components} mask(s), lesion {100 * info.lesion_fraction:.1f}%",
                 fontsize=8)
    ax.axis("off")
plt.tight_layout()
plt.show()"""),
    ("md", """## 2. Exploratory analysis

`eda` (`tf-bus eda`) writes `eda.json` and PNG charts: class counts, image sizes and the
lesion area as a share of the image, by class. Malignant lesions are larger and more
irregular; normal images have empty masks."""),
    ("code", """from tf_bus.data.eda import eda

stats = eda(raw, work / "eda_raw")
print({k: stats[k] for k in ("image_height", "image_width")})
display(Image(filename=str(work / "eda_raw" / "lesion_area.png"), width=720))"""),
    ("md", """## 3. A split without leakage

BUSI holds near-duplicate frames of the same scan. A random split puts one frame in
train and its twin in test, and the test score measures memory, not skill: that is how
published BUSI results reach 0.95. `find_duplicates` groups exact and near duplicates by
comparing thumbnails. The split then assigns whole groups, stratified by class."""),
    ("code", """from tf_bus.data.split import find_duplicates

dups = find_duplicates(read.infos)
print(len(dups.groups), "groups for", len(read.infos), "cases;", len(dups.near_pairs), "near-duplicate pair(s)")
a, b, corr, detail = dups.near_pairs[0]
info = {i.case.case_id: i for i in read.infos}
fig, axes = plt.subplots(1, 2, figsize=(6.5, 3))
for ax, cid in zip(axes, (a, b)):
    ax.imshow(load_image(info[cid].case.image_path), cmap="gray")
    ax.set_title(cid, fontsize=9)
    ax.axis("off")
fig.suptitle(f"near duplicates: thumbnail correlation {corr:.3f}, detail correlation {detail:.3f}", fontsize=9)
plt.show()"""),
    ("md", """`prepare` (`tf-bus prepare`) makes the split, writes it to `splits.json` (reused by
every later run), and writes both folder layouts. The training split of the
classification layout is balanced with augmented copies of the minority classes. The
copies go to training only, never to validation or test."""),
    ("code", """from tf_bus.data.layouts import prepare

prepared = work / "prepared"
report = prepare(raw, prepared)
plan = json.loads((prepared / "splits.json").read_text())
print("the near-duplicate pair is in:", {c: plan["cases"][c] for c in (a, b)})
fig, axes = plt.subplots(1, 2, figsize=(9, 3), sharey=True)
for ax, (title, counts) in zip(axes, (("before balancing", report.counts_before_balancing),
                                      ("after balancing", report.counts_after_balancing))):
    x = np.arange(3)
    for k, split in enumerate(("train", "validation", "test")):
        ax.bar(x + 0.27 * (k - 1), [counts[split][c] for c in ("benign", "malignant", "normal")], 0.27, label=split)
    ax.set_xticks(x, ["benign", "malignant", "normal"])
    ax.set_title(title)
axes[0].legend()
plt.show()"""),
    ("md", """## 4. The two layouts

The classification layout is `classification/{train,validation,test}/<class>/`. The
segmentation layout is `segmentation/{train,val,test}_images/{train,Val,test}/` with
matching `*_masks/` folders, as the original pipeline named them."""),
    ("code", """def tree(root: Path, depth: int = 3) -> None:
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_dir() and len(rel.parts) <= depth:
            n = sum(1 for f in p.iterdir() if f.is_file())
            print("    " * (len(rel.parts) - 1) + rel.name + "/", f"({n} files)" if n else "")

tree(prepared)"""),
    ("md", """## 5. tf.data loaders

`classification_dataset` and `segmentation_dataset` read either layout, or the raw
release with a `splits.json`. They decode, resize, augment (the same random geometry for
image and mask), batch and prefetch. Below is one augmented training batch with its mask
outlines."""),
    ("code", """from tf_bus.config import LoaderConfig
from tf_bus.data.pipeline import classification_dataset, segmentation_dataset

size = (64, 64) if FAST else (128, 128)
x, y = next(iter(classification_dataset(prepared, "train", LoaderConfig(image_size=size, batch_size=8))))
print("classification batch:", x.shape, x.dtype.name, "labels", y.numpy().tolist())
x, m = next(iter(segmentation_dataset(prepared, "train", LoaderConfig(image_size=size, batch_size=8))))
print("segmentation batch:", x.shape, "masks", m.shape)
fig, axes = plt.subplots(1, 8, figsize=(16, 2.3))
for ax, img, mask in zip(axes, x.numpy(), m.numpy()):
    ax.imshow(img.squeeze(), cmap="gray", vmin=0, vmax=1)
    if mask.max() > 0:
        ax.contour(mask.squeeze(), levels=[0.5], colors="lime", linewidths=1)
    ax.axis("off")
plt.show()"""),
    ("md", """## 6. Train the U-Net

A from-scratch Keras U-Net (Ronneberger et al., 2015) with BCE + Dice loss
(`tf-bus train-segmenter`). The run folder holds the config, the best and last models,
the history, TensorBoard logs (with a profiler trace of the batches given), and the
training diagnostics report."""),
    ("code", """from tf_bus.config import SegmenterConfig
from tf_bus.training.segmentation import train_segmenter

seg_cfg = SegmenterConfig(image_size=size, depth=3 if FAST else 4, base_filters=8 if FAST else 16,
                          epochs=2 if FAST else 20, batch_size=8, warmup_epochs=0, time_budget_minutes=0,
                          profile_batches=(2, 3))
unet_run = work / "runs" / "unet"
summary = train_segmenter(prepared, unet_run, seg_cfg, verbose=2)
print(json.dumps({k: summary[k] for k in ("best_val_dice", "epochs_run_in_this_fit", "wall_seconds")}, indent=1))"""),
    ("md", """## 7. Train the classifier

ResNet50 (or ResNet101) with a new head (`tf-bus train-classifier`). With internet, use
`weights="imagenet"`: Keras downloads the ImageNet backbone, and tf-bus fine-tunes it in
two phases, the head first, then the top stages. Here, offline, a local weights file
takes its place. We save a randomly initialised backbone to show the path (a real run
would use real pre-trained weights, or `weights=None` to train from scratch). Fine-tuning
only the top stage keeps this cell short."""),
    ("code", """from tf_bus.config import ClassifierConfig
from tf_bus.training.classification import train_classifier

weights_file = work / "resnet50_notop.weights.h5"
keras.applications.ResNet50(include_top=False, weights=None, input_shape=(*size, 3)).save_weights(weights_file)
cls_cfg = ClassifierConfig(image_size=size, weights=str(weights_file), fine_tune_stages=1,
                           head_epochs=1, epochs=1 if FAST else 10, batch_size=8, warmup_epochs=0,
                           time_budget_minutes=0)
cls_run = work / "runs" / "resnet50"
summary = train_classifier(prepared, cls_run, cls_cfg, verbose=2)
print(json.dumps({k: summary[k] for k in ("best_val_f1", "epochs_run_in_this_fit", "wall_seconds")}, indent=1))"""),
    ("md", """## 8. Evaluation

Segmentation metrics are per image and then averaged (`tf-bus evaluate-segmenter`):
TPR = |A∩G|/|G|, FPR = |A∪G − G|/|G| (relative to the true area), Jaccard, Dice,
precision and HD95. Lesion images and normal images (empty truth) are reported apart.
Classification metrics (`tf-bus evaluate-classifier`) are per class, macro-averaged,
with a confusion matrix, one-vs-rest ROC curves and a reliability diagram (Brier score,
expected calibration error)."""),
    ("code", """from tf_bus.evaluation import evaluate_classifier, evaluate_segmenter

seg_eval = evaluate_segmenter(unet_run, prepared, "test")
lesion = seg_eval["aggregate"]["lesion_images"]
rows = ["| metric | mean | median |", "|---|---|---|"] + [
    f"| {k} | {lesion[k].get('mean', float('nan')):.3f} | {lesion[k].get('median', float('nan')):.3f} |"
    for k in ("dice", "jaccard", "tpr", "fpr")]
display(Markdown("**U-Net, test lesion images**\\n\\n" + "\\n".join(rows)))
display(Image(filename=str(unet_run / "eval_test" / "overlays.png"), width=720))"""),
    ("code", """cls_eval = evaluate_classifier(cls_run, prepared, "test")
display(Markdown(f"**Classifier, test:** accuracy {cls_eval['accuracy']:.3f}, macro-F1 {cls_eval['macro_f1']:.3f}"))
display(Image(filename=str(cls_run / "eval_test" / "confusion_matrix.png"), width=360))
display(Image(filename=str(cls_run / "eval_test" / "roc.png"), width=360))
cal = cls_eval["calibration"]
display(Markdown(f"**Calibration:** Brier {cal['brier']:.3f}, ECE {cal['ece']:.3f}"))
display(Image(filename=str(cls_run / "eval_test" / "calibration.png"), width=360))"""),
    ("md", """Where does the classifier look? `explain_images` (`tf-bus explain`) draws Grad-CAM maps
of the predicted class over each image. With a BUSI mask beside the image it also says
whether the map's peak falls in the lesion (the "pointing game"). A one-epoch model's
maps mean little; those of a trained run are discussed in the README."""),
    ("code", """from tf_bus.explain import explain_images

cases = [next(i.case.image_path for i in read.infos if i.case.label == c) for c in ("benign", "malignant")]
maps = explain_images(cls_run, cases, work / "explain")
fig, axes = plt.subplots(1, len(maps), figsize=(4 * len(maps), 3.2))
for ax, m in zip(axes, maps):
    ax.imshow(PILImage.open(m["gradcam"]))
    ax.set_title(f"{Path(m['image']).name}: {m['class']}, peak in lesion: {m['peak_in_lesion']}", fontsize=8)
    ax.axis("off")
plt.tight_layout()
plt.show()"""),
    ("md", """## 9. Export for TensorFlow Serving

`export_run` (`tf-bus export`) writes a SavedModel to `<models>/<name>/<version>/`, the
layout TensorFlow Serving polls. Its `serving_default` signature takes encoded image
bytes (PNG or JPEG, any size): clients send files, not tensors."""),
    ("code", """from tf_bus.export import export_run

models = work / "models"
for run, name in ((unet_run, "busi_segmenter"), (cls_run, "busi_classifier")):
    exported = export_run(run, models, name)
    print(name, "->", exported["path"], exported["signatures"])"""),
    ("md", """## 10. Serve and query over REST and gRPC

The official `tensorflow/serving` image serves these folders as they are (see `docker/`).
Where there is no TF Serving binary, `tf-bus serve` speaks the same REST and gRPC
protocols (`ModelServer` below is what that command runs). It reads the same
`models.config`."""),
    ("code", """from tf_bus.serving.client import GrpcClient, RestClient
from tf_bus.serving.server import serve_on_loopback

# Writes models.config (TF Serving's format) and starts the server on free loopback ports.
server = serve_on_loopback(models, ("busi_segmenter", "busi_classifier"), work / "models.config")
print(f"gRPC on 127.0.0.1:{server.grpc_port}, REST on 127.0.0.1:{server.rest_port}")
print((work / "models.config").read_text())"""),
    ("md", """Over REST, the request is TF Serving's JSON, with binary inputs as `{"b64": ...}`.
The equivalent `curl` call is printed too."""),
    ("code", """image_path = next((prepared / "segmentation" / "test_images" / "test").glob("*.png"))
png = image_path.read_bytes()
rest = RestClient(f"127.0.0.1:{server.rest_port}")
pred = rest.predict("busi_classifier", instances=[{"b64": base64.b64encode(png).decode()}])["predictions"][0]
print(image_path.name, "->", pred["class_names"], np.round(pred["probabilities"], 3))
print(f"curl -d '{{\\"instances\\": [{{\\"b64\\": \\"...\\"}}]}}' "
      f"http://127.0.0.1:{server.rest_port}/v1/models/busi_classifier:predict")"""),
    ("code", """images = np.empty(1, dtype=object)
images[:] = [png]
with GrpcClient(f"127.0.0.1:{server.grpc_port}") as grpc_client:
    out = grpc_client.predict("busi_segmenter", {"images": images})
mask = PILImage.open(__import__("io").BytesIO(out["mask_png_bytes"][0]))
fig, axes = plt.subplots(1, 2, figsize=(6, 3))
axes[0].imshow(load_image(str(image_path)), cmap="gray")
axes[1].imshow(mask, cmap="gray")
for ax, t in zip(axes, ("image", f"predicted mask (lesion {100 * out['lesion_area_fraction'][0]:.1f}%)")):
    ax.set_title(t, fontsize=9)
    ax.axis("off")
plt.show()
server.stop()"""),
    ("md", """## 11. Tune the classifier with KerasTuner

`tune_classifier` (`tf-bus tune`) searches the learning rate, weight decay, batch size,
dropout, backbone, epochs and unfrozen stages with random search, Hyperband or Bayesian
optimisation. It writes every trial's score to `trials.json`, and the best configuration
to `best_hyperparameters.json`. Two trials here."""),
    ("code", """from tf_bus.config import TuneConfig
from tf_bus.training.tuning import tune_classifier

tune_cfg = TuneConfig(base=ClassifierConfig(image_size=size, weights=str(weights_file), epochs=1, warmup_epochs=0,
                                            time_budget_minutes=0, early_stopping_patience=0),
                      max_trials=2, backbones=("resnet50",), batch_sizes=(8, 16), epochs_range=(1, 1),
                      fine_tune_stages_range=(1, 1), learning_rate_range=(1e-4, 1e-2))
best = tune_classifier(prepared, work / "tune", tune_cfg, verbose=0)
trials = json.loads((work / "tune" / "trials.json").read_text())["trials"]
rows = ["| trial | status | val macro-F1 | learning rate | batch |", "|---|---|---|---|---|"] + [
    f"| {t['trial_id']} | {t['status']} | {t['score']:.3f} | {t['hyperparameters']['learning_rate']:.2e} | "
    f"{t['hyperparameters']['batch_size']} |" for t in trials]
display(Markdown("\\n".join(rows)))
print("best:", best["values"])"""),
    ("md", """## 12. TensorBoard, the profiler trace and the diagnostics

Each run writes TensorBoard logs under `RUN_DIR/logs`. `tensorboard --logdir` on that
folder shows the scalars, sample overlays and, under *Profile*, the trace of the batches
named by `profile_batches` (`--profile-batches 2,3` on the command line). The training
diagnostics (vanishing or exploding gradients, overfitting, poor initialisation, a
stalled loss) are in `diagnostics.md`, with `gradient_norms.png`."""),
    ("code", """traces = sorted(p.relative_to(unet_run) for p in (unet_run / "logs").rglob("*.xplane.pb"))
print("profiler trace(s):", [str(t) for t in traces])
print(f"tensorboard --logdir {unet_run / 'logs'}")
report = (unet_run / "diagnostics.md").read_text()
display(Markdown("\\n".join(line for line in report.splitlines() if not line.startswith("!["))))
display(Image(filename=str(unet_run / "gradient_norms.png"), width=560))"""),
    ("md", """## Where next

- Train for real: `tf-bus train-segmenter --data DIR --out RUN_DIR` and
  `tf-bus train-classifier ...` (README, with the results measured on real BUSI).
- Stage the data through S3: `tf-bus stage all ...`.
- Serve: `docker compose -f docker/docker-compose.yml up serving` or `tf-bus serve`."""),
]


def build() -> dict:
    cells = []
    for i, (kind, text) in enumerate(CELLS):
        lines = text.splitlines(keepends=True)
        cell = {"cell_type": "markdown" if kind == "md" else "code", "id": f"cell-{i:02d}", "metadata": {},
                "source": lines}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
            if text.startswith("# Parameters"):
                cell["metadata"] = {"tags": ["parameters"]}
        cells.append(cell)
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def render() -> str:
    return json.dumps(build(), indent=1, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    TARGET.write_text(render())
    print(f"wrote {TARGET}", file=sys.stderr)
