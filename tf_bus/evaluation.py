"""Offline evaluation (stage 7 of the pipeline): per-image mask metrics, reports, plots.

Mask metrics, for a predicted mask A and a true mask G of one image, at the image's own
resolution (the prediction is resized back before thresholding):

* TPR = |A∩G| / |G|
* FPR = |A − G| / |G|    (the STAN paper's definition: false area relative to the true area)
* Jaccard = |A∩G| / |A∪G|,  Dice = 2|A∩G| / (|A| + |G|),  precision = |A∩G| / |A|
* HD95: the 95th percentile of the symmetric distances between the two boundaries (px)

Edge cases, by definition:

* G empty (a normal image): TPR, FPR, Jaccard, Dice, precision and HD95 are undefined
  (NaN) and such images are reported apart: ``fp_area_fraction`` = |A| / image area and
  ``predicted_empty`` = (|A| = 0).
* G not empty, A empty: TPR = 0, FPR = 0, Jaccard = 0, Dice = 0, precision = 0 (nothing
  found), HD95 = NaN (no boundary to measure; counted in ``hd95_undefined``).

Aggregates average lesion images and normal images separately.

Post-processing (nnU-Net's habit, chosen on validation): ``largest`` keeps the largest
8-connected component of the thresholded mask and fills its holes (BUSI images hold one
lesion); ``none`` keeps the thresholded mask as it is.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from tf_bus.data.busi import TfBusError

METRIC_KEYS = ("tpr", "fpr", "jaccard", "dice", "precision", "hd95")
POSTPROCESSING = ("none", "largest")


def postprocess_mask(mask: np.ndarray, mode: str = "none") -> np.ndarray:
    """``mask`` (bool, H x W) after post-processing ``mode`` (see the module docstring)."""
    mask = np.asarray(mask, bool)
    if mode == "none":
        return mask
    if mode != "largest":
        raise ValueError(f"postprocessing must be one of {', '.join(POSTPROCESSING)}. Received: {mode!r}")
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    return ndimage.binary_fill_holes(labels == largest)


def _boundary(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, truth: np.ndarray) -> float:
    """95th-percentile symmetric boundary distance in pixels; NaN if either is empty."""
    from scipy import ndimage

    a, g = pred.astype(bool), truth.astype(bool)
    if not a.any() or not g.any():
        return math.nan
    ba, bg = _boundary(a), _boundary(g)
    da = ndimage.distance_transform_edt(~bg)[ba]  # from A's boundary to G's
    dg = ndimage.distance_transform_edt(~ba)[bg]
    return float(np.percentile(np.concatenate([da, dg]), 95))


def mask_metrics(pred: np.ndarray, truth: np.ndarray, *, with_hd95: bool = True) -> dict[str, Any]:
    """Metrics of one binary prediction against one binary truth (any shape, same shape).

    Returns:
        ``tpr, fpr, jaccard, dice, precision, hd95`` (NaN where undefined, see the module
        docstring), ``true_area``, ``pred_area`` (pixels), ``fp_area_fraction``,
        ``predicted_empty``, ``lesion`` (truth not empty).
    """
    a = np.asarray(pred).astype(bool)
    g = np.asarray(truth).astype(bool)
    if a.shape != g.shape:
        raise ValueError(f"prediction and truth shapes differ. Received: {a.shape} and {g.shape}")
    inter = int(np.count_nonzero(a & g))
    na, ng = int(np.count_nonzero(a)), int(np.count_nonzero(g))
    union = na + ng - inter
    out: dict[str, Any] = {"true_area": ng, "pred_area": na, "lesion": ng > 0,
                           "fp_area_fraction": (na - inter) / a.size, "predicted_empty": na == 0}
    if ng == 0:
        out.update({k: math.nan for k in METRIC_KEYS})
        return out
    out.update({
        "tpr": inter / ng,
        "fpr": (na - inter) / ng,
        "jaccard": inter / union,
        "dice": 2 * inter / (na + ng),
        "precision": inter / na if na else 0.0,
        "hd95": hd95(a, g) if with_hd95 else math.nan,
    })
    return out


def _stats(values: list[float]) -> dict[str, float | int]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
    if not v.size:
        return {"n": 0}
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)),
            "std": float(v.std()), "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90))}


def aggregate_mask_metrics(per_image: list[dict[str, Any]]) -> dict[str, Any]:
    """Means (and medians, spread) over lesion images; normal images reported apart. An
    undefined metric may be NaN or None (as ``metrics.json`` stores it)."""
    lesion = [r for r in per_image if r["lesion"]]
    normal = [r for r in per_image if not r["lesion"]]
    out: dict[str, Any] = {
        "lesion_images": {"n": len(lesion), **{k: _stats([r[k] for r in lesion]) for k in METRIC_KEYS}},
        "normal_images": {
            "n": len(normal),
            "share_predicted_empty": float(np.mean([r["predicted_empty"] for r in normal])) if normal else None,
            "fp_area_fraction": _stats([r["fp_area_fraction"] for r in normal]),
        },
    }
    out["lesion_images"]["hd95_undefined"] = sum(1 for r in lesion if r["hd95"] is None or math.isnan(r["hd95"]))
    # The tail that pulls the mean down: how many lesions are poorly segmented, found nowhere
    # (the prediction does not touch them), or left with an empty prediction.
    out["lesion_images"]["failures"] = {
        "dice_below_0.5": sum(1 for r in lesion if r["dice"] < 0.5),
        "no_overlap": sum(1 for r in lesion if r["tpr"] == 0),
        "predicted_empty": sum(1 for r in lesion if r["predicted_empty"]),
    }
    return out


# --------------------------------------------------------------------------- the segmenter

def _truth_paths(data, split: str, splits_file=None) -> dict[str, tuple[str, str]]:
    """name -> (image path, joined mask paths) for every case of ``split``."""
    from tf_bus.config import CLASS_NAMES
    from tf_bus.data.layouts import layout_stem
    from tf_bus.data.pipeline import detect_layout, list_release, list_segmentation

    kind, root = detect_layout(data, "segmentation")
    if kind == "segmentation":
        images, masks = list_segmentation(root, split)
        return {Path(i).stem: (i, m) for i, m in zip(images, masks)}
    images, masks, labels = list_release(root, split, splits_file=splits_file)
    return {layout_stem(f"{CLASS_NAMES[l]}/{Path(i).stem}"): (i, m) for i, m, l in zip(images, masks, labels)}


def load_segmenter(run_dir):
    """``(config, record, model, cross_validation summary or None)`` of a train-segmenter run
    folder, of a ``--folds K`` folder (model: its folds averaged,
    ``tf_bus.export.fold_ensemble``), or of an ``--ensemble K`` folder (its members averaged;
    no summary)."""
    from tf_bus.config import SegmenterConfig
    from tf_bus.export import read_averaged
    from tf_bus.training.segmentation import load_best_model, load_run_config

    averaged = read_averaged(run_dir)
    if averaged:
        if averaged.kind != "segmenter":
            raise TfBusError(f"{run_dir}: holds a `tf-bus train-{averaged.kind} {averaged.flag}` {averaged.what}, "
                             "not a train-segmenter one.")
        return SegmenterConfig.from_dict(averaged.record["config"]), averaged.record, averaged.model, averaged.summary
    cfg, record = load_run_config(run_dir)
    return cfg, record, load_best_model(run_dir), None


def refuse_own_data(run_dir, record: dict[str, Any], data) -> None:
    """A ``--folds K`` folder's average cannot be scored on the data it cross-validated:
    every case there trained some of its folds."""
    from tf_bus.data.layouts import prepared_source

    def release(path) -> Path:
        p = Path(str(path)).expanduser().resolve()
        return prepared_source(p) or p

    if release(data) == release(record.get("data", "")):
        raise TfBusError(f"{run_dir}: is a cross-validation of {data}, so every case there trained some of its "
                         f"folds and their average has no held-out case to be scored on. Evaluate it on other "
                         f"data; its folds' own held-out scores are in {Path(run_dir) / 'cross_validation.json'}.")


def predict_split(run_dir, data, split: str, *, tta: bool = False, splits_file=None, loaded=None):
    """Predicts every image of ``split`` at its own resolution; ``loaded``: what
    ``load_segmenter(run_dir)`` returned, to load the model once for several splits.

    Returns:
        A list of ``(name, image_path, probabilities (H, W) float32, truth (H, W) uint8)``.
    """
    import tensorflow as tf

    from tf_bus.data.busi import load_mask
    from tf_bus.data.pipeline import segmentation_dataset
    from tf_bus.training.segmentation import loader_config

    cfg, _, model, _ = loaded or load_segmenter(run_dir)
    paths = _truth_paths(data, split, splits_file)
    ds = segmentation_dataset(data, split, loader_config(cfg, shuffle=False, augment=False, cache=False),
                              training=False, include_names=True, splits_file=splits_file)
    out = []
    for x, _, names in ds:
        prob = model.predict_on_batch(x)
        if tta:
            prob = (np.asarray(prob) + np.asarray(model.predict_on_batch(tf.reverse(x, [2])))[:, :, ::-1]) / 2.0
        prob = np.asarray(prob, np.float32)
        for p, name in zip(prob, names.numpy()):
            name = name.decode()
            image_path, mask_paths = paths[name]
            truth = load_mask(tuple(mask_paths.split("\n")))
            full = tf.image.resize(p, truth.shape, method="bilinear").numpy()[..., 0]
            out.append((name, image_path, full, truth))
    return out


def choose_threshold(predictions, candidates=None, postprocess: str = "none") -> tuple[float, dict[str, float]]:
    """The threshold with the best mean Dice over lesion images (ties: nearest 0.5), with
    ``postprocess`` applied to each thresholded mask."""
    candidates = candidates or [round(t, 2) for t in np.arange(0.2, 0.81, 0.05)]
    scores = {}
    for t in candidates:
        dices = [mask_metrics(postprocess_mask(p >= t, postprocess), g, with_hd95=False)["dice"]
                 for _, _, p, g in predictions if g.any()]
        scores[t] = float(np.mean(dices)) if dices else 0.0
    best = max(candidates, key=lambda t: (round(scores[t], 4), -abs(t - 0.5)))
    return best, scores


def choose_postprocessing(predictions, candidates=None) -> tuple[float, str, dict[str, dict[float, float]]]:
    """The (threshold, post-processing) pair with the best mean lesion Dice; ``none`` wins
    ties. Returns the pair and every mean Dice, by post-processing then threshold."""
    scores, best = {}, None
    for mode in POSTPROCESSING:
        t, scores[mode] = choose_threshold(predictions, candidates, mode)
        if best is None or round(scores[mode][t], 4) > round(scores[best[1]][best[0]], 4):
            best = (t, mode)
    return best[0], best[1], scores


def _overlay_grid(rows, path) -> None:
    """rows: (name, image path, prediction mask, truth mask, dice) -> PNG grid."""
    from PIL import Image

    from tf_bus.plots import save_png, subplots

    n = len(rows)
    fig, axes = subplots(n, 3, figsize=(7.5, 2.3 * n), squeeze=False)
    for r, (name, image_path, pred, truth, dice) in enumerate(rows):
        with Image.open(image_path) as im:
            grey = np.asarray(im.convert("L"))
        title = f"{name}" + ("" if math.isnan(dice) else f"  Dice {dice:.2f}")
        for c, (img, label) in enumerate(((None, title), (truth, "truth"), (pred, "prediction"))):
            ax = axes[r, c]
            ax.imshow(grey, cmap="gray")
            if img is not None and img.any():
                ax.contour(img, levels=[0.5], colors="lime" if c == 1 else "red", linewidths=1)
            ax.set_title(label, fontsize=7)
            ax.axis("off")
    save_png(fig, path, dpi=80)


def evaluate_segmenter(
    run_dir,
    data,
    split: str = "test",
    *,
    tta: bool = False,
    threshold: float | None = None,
    postprocess: str | None = None,
    choose_on_validation: bool = False,
    splits_file=None,
    max_overlays: int = 12,
) -> dict[str, Any]:
    """Evaluates RUN_DIR's best model on ``split``; writes ``RUN_DIR/eval_<split>/``.

    Threshold: ``threshold`` if given; else, with ``choose_on_validation``, the best on the
    validation split (saved to ``RUN_DIR/threshold.json``); else a saved
    ``threshold.json``; else the run's config threshold. Post-processing (``none`` or
    ``largest``): ``postprocess`` if given; else chosen on validation together with the
    threshold; else the saved choice; else ``none``.

    RUN_DIR may be a ``--folds K`` folder: its folds averaged, by default at the median of
    their thresholds and the post-processing most chose (as ``tf-bus export`` serves it). Each
    case of the data it cross-validated trained some fold, so that data is refused.

    Returns:
        ``{"settings", "aggregate", "per_image"}`` as saved in ``metrics.json``; also
        ``overlays.png`` (image, truth, prediction for lesion images across the Dice range
        and a few normal images).
    """
    from tf_bus.export import mask_settings
    from tf_bus.io import write_json_atomic

    run_dir = Path(run_dir)
    loaded = load_segmenter(run_dir)
    _, record, _, summary = loaded
    if summary is not None:
        refuse_own_data(run_dir, record, data)
    saved = run_dir / "threshold.json"
    if postprocess is not None and postprocess not in POSTPROCESSING:
        raise ValueError(f"postprocess must be one of {', '.join(POSTPROCESSING)}. Received: {postprocess!r}")
    chosen_scores = None
    if threshold is None and choose_on_validation:
        val = predict_split(run_dir, data, "validation", tta=tta, splits_file=splits_file, loaded=loaded)
        if postprocess is None:
            threshold, postprocess, chosen_scores = choose_postprocessing(val)
        else:
            threshold, by_threshold = choose_threshold(val, postprocess=postprocess)
            chosen_scores = {postprocess: by_threshold}
        write_json_atomic(saved, {"threshold": threshold, "postprocess": postprocess, "tta": tta,
                                  "validation_mean_dice": chosen_scores})
    threshold, postprocess = mask_settings(run_dir, record, summary, threshold, postprocess)
    preds = predict_split(run_dir, data, split, tta=tta, splits_file=splits_file, loaded=loaded)
    per_image = []
    masks = [postprocess_mask(prob >= threshold, postprocess) for _, _, prob, _ in preds]
    for (name, _, prob, truth), mask in zip(preds, masks):
        m = mask_metrics(mask, truth)
        per_image.append({"name": name, **{k: (None if isinstance(v, float) and math.isnan(v) else v)
                                           for k, v in m.items()}})
    agg = aggregate_mask_metrics(per_image)
    out_dir = run_dir / f"eval_{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "settings": {"split": split, "threshold": threshold, "postprocess": postprocess, "tta": tta,
                     "data": str(data), "threshold_scores_on_validation": chosen_scores},
        "aggregate": agg,
        "per_image": per_image,
    }
    write_json_atomic(out_dir / "metrics.json", result)
    triples = [(pr, r, mask) for pr, r, mask in zip(preds, per_image, masks)]
    lesion = sorted((t for t in triples if t[1]["lesion"]), key=lambda t: t[1]["dice"])
    picks = [lesion[int(round(i))] for i in np.linspace(0, len(lesion) - 1, min(max_overlays, len(lesion)))] if lesion else []
    normals = [t for t in triples if not t[1]["lesion"]][:3]
    rows = [(r["name"], pr[1], mask, pr[3], math.nan if r["dice"] is None else r["dice"])
            for pr, r, mask in picks + normals]
    if rows:
        _overlay_grid(rows, out_dir / "overlays.png")
    return result


# --------------------------------------------------------------------------- the classifier

def classification_metrics(y_true, probabilities, class_names=None) -> dict[str, Any]:
    """Accuracy, per-class and macro precision/recall/F1, one-vs-rest ROC AUC, confusion matrix,
    and calibration (``calibration_metrics``).

    Args:
        y_true: (N,) int labels.
        probabilities: (N, C) class probabilities.
        class_names: names of the C classes (default: benign, malignant, normal).

    Returns:
        A JSON-ready dict; AUC of a class absent from ``y_true`` is None.
    """
    from sklearn import metrics as skm

    from tf_bus.config import CLASS_NAMES

    names = list(class_names or CLASS_NAMES)
    y_true = np.asarray(y_true, int)
    prob = np.asarray(probabilities, np.float64)
    y_pred = prob.argmax(axis=1)
    labels = list(range(len(names)))
    p, r, f, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    auc = {}
    for k, name in enumerate(names):
        positives = y_true == k
        auc[name] = float(skm.roc_auc_score(positives, prob[:, k])) if 0 < positives.sum() < len(y_true) else None
    defined = [v for v in auc.values() if v is not None]
    return {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "macro_precision": float(np.mean(p)),
        "macro_recall": float(np.mean(r)),
        "macro_f1": float(np.mean(f)),
        "per_class": {name: {"precision": float(p[k]), "recall": float(r[k]), "f1": float(f[k]),
                             "support": int(support[k]), "roc_auc_ovr": auc[name]} for k, name in enumerate(names)},
        "macro_roc_auc_ovr": float(np.mean(defined)) if defined else None,
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "calibration": calibration_metrics(y_true, prob),
        "class_names": names,
    }


def calibration_metrics(y_true, probabilities, n_bins: int = 10) -> dict[str, Any]:
    """How far the predicted probabilities can be read as frequencies.

    * ``brier``: the multi-class Brier score, the mean over images of
      sum_k (p_k - [y = k])^2 (0 is perfect; 2 the worst; always answering 1/3 for three
      classes scores 2/3).
    * ``log_loss``: the mean of -ln p_y (p clipped to 1e-15).
    * ``ece``: the expected calibration error of the top class (Guo et al. 2017): images
      binned by their top probability into ``n_bins`` equal bins (lo, hi], then the mean
      over images of |accuracy of the bin - mean top probability of the bin|.
    * ``bins``: each non-empty bin's range, count, accuracy and mean top probability (the
      reliability diagram).
    """
    y_true = np.asarray(y_true, int)
    prob = np.asarray(probabilities, np.float64)
    n, c = prob.shape
    onehot = np.eye(c)[y_true]
    confidence = prob.max(axis=1)
    correct = prob.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges, right=True) - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        inside = which == b
        if inside.any():
            acc, conf = float(correct[inside].mean()), float(confidence[inside].mean())
            ece += inside.sum() / n * abs(acc - conf)
            bins.append({"lower": round(float(edges[b]), 6), "upper": round(float(edges[b + 1]), 6),
                         "count": int(inside.sum()), "accuracy": acc, "confidence": conf})
    return {
        "brier": float(np.mean(np.sum((prob - onehot) ** 2, axis=1))),
        "log_loss": float(-np.mean(np.log(np.clip(prob[np.arange(n), y_true], 1e-15, 1.0)))),
        "ece": float(ece),
        "n_bins": n_bins,
        "bins": bins,
    }


def _classification_plots(y_true, prob, result, out_dir) -> None:
    from sklearn import metrics as skm

    from tf_bus.plots import save_png, subplots

    names = result["class_names"]
    cm = np.asarray(result["confusion_matrix"])
    fig, ax = subplots(figsize=(4.6, 4))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f}")
    save_png(fig, out_dir / "confusion_matrix.png")

    fig, ax = subplots(figsize=(4.6, 4))
    for k, name in enumerate(names):
        positives = np.asarray(y_true) == k
        if 0 < positives.sum() < len(positives):
            fpr, tpr, _ = skm.roc_curve(positives, np.asarray(prob)[:, k])
            ax.plot(fpr, tpr, label=f"{name} (AUC {result['per_class'][name]['roc_auc_ovr']:.3f})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC, one vs rest")
    ax.legend(fontsize=8)
    save_png(fig, out_dir / "roc.png")

    cal = result["calibration"]
    fig, (ax, hist) = subplots(2, 1, figsize=(4.6, 5.2), height_ratios=(3, 1), sharex=True)
    lower = [b["lower"] for b in cal["bins"]]
    width = 1.0 / cal["n_bins"]
    ax.bar(lower, [b["accuracy"] for b in cal["bins"]], width=width, align="edge", edgecolor="black",
           linewidth=0.6, label="accuracy")
    ax.plot([lo + width / 2 for lo in lower], [b["confidence"] for b in cal["bins"]], "_", color="tab:red",
            markersize=14, markeredgewidth=2, label="mean top probability (a bar's target)")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy of the bin")
    ax.set_title(f"reliability: ECE {cal['ece']:.3f}, Brier {cal['brier']:.3f}")
    ax.legend(fontsize=8, loc="upper left")
    hist.bar(lower, [b["count"] for b in cal["bins"]], width=width, align="edge", color="grey")
    hist.set_xlabel("top-class probability")
    hist.set_ylabel("images")
    save_png(fig, out_dir / "calibration.png")


def evaluate_classifier(run_dir, data, split: str = "test", *, splits_file=None, tta: bool = False,
                        checkpoint: str = "best") -> dict[str, Any]:
    """Evaluates RUN_DIR's classifier on ``split`` (original images only, no balancing
    copies); writes ``RUN_DIR/eval_<split>/metrics.json``, ``confusion_matrix.png`` and
    ``roc.png``. RUN_DIR may be a ``--folds K`` folder: its folds' ``best.keras`` averaged
    (as ``tf-bus export`` serves them), on data other than what it cross-validated.

    Args:
        tta: average the probabilities of each image and its left-right mirror image.
        checkpoint: ``best`` (the run's best ``monitor`` epoch; ``last.keras`` if there is none) or
            ``last`` (the weights at the end of training).
    """
    import keras
    import tensorflow as tf

    from tf_bus.config import ClassifierConfig
    from tf_bus.data.pipeline import classification_dataset
    from tf_bus.io import write_json_atomic
    from tf_bus.training.classification import loader_config
    from tf_bus.training.common import read_run_record

    from tf_bus.export import read_averaged

    run_dir = Path(run_dir)
    if checkpoint not in ("best", "last"):
        raise TfBusError(f"`checkpoint` must be best or last. Received: checkpoint={checkpoint!r}")
    averaged = read_averaged(run_dir)
    if averaged:
        if checkpoint != "best":
            raise TfBusError(f"{run_dir}: the {averaged.what}'s average is of its {averaged.part}s' best.keras; leave "
                             f"out --checkpoint last, or evaluate one {averaged.part}'s folder.")
        if averaged.kind != "classifier":
            raise TfBusError(f"{run_dir}: holds a `tf-bus train-{averaged.kind} {averaged.flag}` {averaged.what}, "
                             "not a train-classifier one; evaluate it with `tf-bus evaluate-segmenter`.")
        record, model = averaged.record, averaged.model
        if averaged.summary is not None:  # every case of a cross-validation's data trained some of its folds
            refuse_own_data(run_dir, record, data)
        path = run_dir
    else:
        _, record = read_run_record(run_dir, expected="classifier")
        path = run_dir / "best.keras" if checkpoint == "best" and (run_dir / "best.keras").exists() \
            else run_dir / "last.keras"
        if not path.exists():
            raise TfBusError(f"{run_dir}: no {'best.keras or ' if checkpoint == 'best' else ''}last.keras; "
                             "train first (tf-bus train-classifier), or let the run finish.")
        model = keras.saving.load_model(path)
    cfg = ClassifierConfig.from_dict(record["config"])
    ds = classification_dataset(data, split, loader_config(cfg, shuffle=False, augment=False, cache=False),
                                training=False, include_augmented=False, include_names=True, splits_file=splits_file)
    ys, probs, names = [], [], []
    for x, y, n in ds:
        prob = np.asarray(model.predict_on_batch(x), np.float64)
        if tta:
            prob = (prob + np.asarray(model.predict_on_batch(tf.reverse(x, [2])), np.float64)) / 2.0
        probs.append(prob)
        ys.append(y.numpy())
        names += [s.decode() for s in n.numpy()]
    y_true, prob = np.concatenate(ys), np.concatenate(probs)
    result = classification_metrics(y_true, prob)
    result["settings"] = {"split": split, "data": str(data), "model": str(path), "checkpoint": checkpoint, "tta": tta}
    result["per_image"] = [{"name": nm, "label": int(t), "probabilities": [round(float(v), 6) for v in pr]}
                           for nm, t, pr in zip(names, y_true, prob)]
    out_dir = run_dir / f"eval_{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "metrics.json", result)
    _classification_plots(y_true, prob, result, out_dir)
    return result
