"""Paired comparison of two evaluations (after evaluation, stage 7): `tf-bus compare A B`.

Is B better than A, or did it land on the other side of the noise? Both must score the same
cases: two cross-validations (``cross_validation.json``: every case tested once) or two
evaluations of one split (``RUN_DIR/eval_<split>/metrics.json``). The cases are paired by
name, so each difference is measured on the same image, and a paired bootstrap over the
cases gives its 95% interval (resampling cases, not folds or pixels).

Segmenters (lesion images; normal images have no Dice): per metric (Dice, Jaccard, TPR,
FPR, precision) the means of A and B, their mean difference B − A and its interval, and the
medians; for Dice, how many images each does better on, and the failures of each (Dice
under 0.5 and 0.05; under 0.5 with TPR < 0.2, "found in the wrong place"). Normal images:
how many each predicts empty.

Classifiers: accuracy and macro-F1 of A and B, the difference B − A of each with its
interval (macro-F1 recomputed in every resample), per-class F1, and the cases one gets
right and the other wrong, with McNemar's exact test on them.

Two cross-validations that dealt the cases into the same folds are also compared fold by
fold (``folds``), which shows how much of a difference one fold carries.

An interval that holds 0 says the data cannot tell the two apart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from tf_bus.data.busi import TfBusError

SEGMENTER_METRICS = ("dice", "jaccard", "tpr", "fpr", "precision")


def find_results(path: str | os.PathLike, split: str = "test") -> Path:
    """The results file of ``path``: itself if a file, else its ``cross_validation.json``,
    else its ``eval_<split>/metrics.json``."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_dir():
        raise TfBusError(f"{p}: no such file or folder; pass a cross-validation folder, a run folder evaluated "
                         f"with `tf-bus evaluate-segmenter/-classifier`, or one of their JSON files.")
    for candidate in (p / "cross_validation.json", p / f"eval_{split}" / "metrics.json"):
        if candidate.is_file():
            return candidate
    raise TfBusError(f"{p}: holds neither cross_validation.json nor eval_{split}/metrics.json. Run "
                     f"`tf-bus evaluate-segmenter {p} --split {split}` (or evaluate-classifier) first, "
                     "or pass --split for another evaluated split.")


def load_results(path: str | os.PathLike, split: str = "test") -> tuple[str, dict[str, dict[str, Any]], Path]:
    """(kind, {case name: per-case row}, file) of an evaluation or cross-validation.
    ``kind`` is ``segmenter`` (rows with ``dice``) or ``classifier`` (rows with ``probabilities``)."""
    file = find_results(path, split)
    try:
        result = json.loads(file.read_text())
        rows = result["per_image"]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TfBusError(f"{file}: not JSON ({e}); pass a tf-bus metrics.json or cross_validation.json.") from None
    except (KeyError, TypeError):
        raise TfBusError(f"{file}: has no per_image list; pass a tf-bus metrics.json or cross_validation.json "
                         "(written by evaluate-segmenter, evaluate-classifier or --folds).") from None
    if not rows:
        raise TfBusError(f"{file}: per_image is empty; nothing to compare.")
    if all("probabilities" in r and "label" in r for r in rows):
        kind = "classifier"
    elif all("dice" in r and "lesion" in r for r in rows):
        kind = "segmenter"
    else:
        raise TfBusError(f"{file}: per_image rows are neither a segmenter's (dice, lesion) nor a classifier's "
                         "(label, probabilities).")
    by_name: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["name"] in by_name:
            raise TfBusError(f"{file}: case {r['name']!r} appears twice; a paired comparison needs each case once.")
        by_name[r["name"]] = r
    return kind, by_name, file


def bootstrap_interval(statistic, n: int, *, resamples: int = 10000, seed: int = 0,
                       chunk: int = 500) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of ``statistic(indices)`` over ``resamples`` draws of
    ``n`` case indices with replacement. ``statistic`` takes an (r, n) integer array and
    returns r values (vectorised over resamples, drawn ``chunk`` at a time)."""
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, resamples, chunk):
        values.append(np.asarray(statistic(rng.integers(0, n, (min(chunk, resamples - start), n))), float))
    low, high = np.percentile(np.concatenate(values), [2.5, 97.5])
    return float(low), float(high)


def _paired(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> dict[str, Any]:
    diff = b - a
    low, high = bootstrap_interval(lambda idx: diff[idx].mean(axis=1), len(diff), resamples=resamples, seed=seed)
    return {"a": float(a.mean()), "b": float(b.mean()), "difference": float(diff.mean()), "ci95": [low, high],
            "median_a": float(np.median(a)), "median_b": float(np.median(b))}


def _failures(dice: np.ndarray, tpr: np.ndarray) -> dict[str, int]:
    return {"dice_below_0.5": int((dice < 0.5).sum()), "dice_below_0.05": int((dice < 0.05).sum()),
            "wrong_place": int(((dice < 0.5) & (tpr < 0.2)).sum())}


def compare_segmenters(a: dict[str, dict], b: dict[str, dict], names: list[str], *, resamples: int = 10000,
                       seed: int = 0) -> dict[str, Any]:
    lesions = [n for n in names if a[n]["lesion"]]
    mismatched = [n for n in names if a[n]["lesion"] != b[n]["lesion"]]
    if mismatched:
        raise TfBusError(f"cases {mismatched[:3]} are lesion images in one result and normal in the other: "
                         "the two were not scored against the same masks.")
    if not lesions:
        raise TfBusError("the shared cases hold no lesion image; Dice is only defined for lesion images.")
    values = {key: tuple(np.array([r[n][key] for n in lesions], float) for r in (a, b)) for key in SEGMENTER_METRICS}
    metrics = {key: _paired(va, vb, resamples, seed) for key, (va, vb) in values.items()}
    (dice_a, dice_b), (tpr_a, tpr_b) = values["dice"], values["tpr"]
    normals = [n for n in names if not a[n]["lesion"]]
    empty_a = np.array([bool(a[n]["predicted_empty"]) for n in normals], dtype=bool)
    empty_b = np.array([bool(b[n]["predicted_empty"]) for n in normals], dtype=bool)
    return {
        "lesion_images": {
            "n": len(lesions), "metrics": metrics,
            "dice_better": {"a": int((dice_a > dice_b).sum()), "b": int((dice_b > dice_a).sum()),
                            "tie": int((dice_a == dice_b).sum())},
            "failures": {"a": _failures(dice_a, tpr_a), "b": _failures(dice_b, tpr_b)},
        },
        "normal_images": {"n": len(normals), "predicted_empty": {"a": int(empty_a.sum()), "b": int(empty_b.sum())},
                          "empty_in_a_only": int((empty_a & ~empty_b).sum()),
                          "empty_in_b_only": int((empty_b & ~empty_a).sum())},
        "_dice": (dice_a, dice_b),
    }


def _f1_per_class(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """F1 of each class (first axis) for ``labels``/``predicted`` of shape (..., n), as
    sklearn defines it; a class with no true and no predicted case scores 0."""
    f1 = []
    for c in range(classes):
        tp = ((labels == c) & (predicted == c)).sum(axis=-1)
        fp = ((labels != c) & (predicted == c)).sum(axis=-1)
        fn = ((labels == c) & (predicted != c)).sum(axis=-1)
        denom = 2 * tp + fp + fn
        f1.append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0))
    return np.array(f1)


def compare_classifiers(a: dict[str, dict], b: dict[str, dict], names: list[str], *, resamples: int = 10000,
                        seed: int = 0, class_names: list[str] | None = None) -> dict[str, Any]:
    from scipy.stats import binomtest

    labels = np.array([a[n]["label"] for n in names])
    if any(a[n]["label"] != b[n]["label"] for n in names):
        raise TfBusError("some shared cases carry different labels in the two results: they were not scored "
                         "against the same data.")
    prob_a = np.array([a[n]["probabilities"] for n in names], float)
    prob_b = np.array([b[n]["probabilities"] for n in names], float)
    if prob_a.shape != prob_b.shape:
        raise TfBusError(f"the two classifiers score {prob_a.shape[1]} and {prob_b.shape[1]} classes.")
    classes = prob_a.shape[1]
    pred_a, pred_b = prob_a.argmax(axis=1), prob_b.argmax(axis=1)
    right_a, right_b = pred_a == labels, pred_b == labels
    accuracy = _paired(right_a.astype(float), right_b.astype(float), resamples, seed)

    def f1_difference(idx):
        return (_f1_per_class(labels[idx], pred_b[idx], classes).mean(axis=0)
                - _f1_per_class(labels[idx], pred_a[idx], classes).mean(axis=0))

    f1_a, f1_b = _f1_per_class(labels, pred_a, classes), _f1_per_class(labels, pred_b, classes)
    only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    class_names = class_names or [f"class_{c}" for c in range(classes)]
    return {
        "n": len(names),
        "accuracy": {k: accuracy[k] for k in ("a", "b", "difference", "ci95")},
        "macro_f1": {"a": float(f1_a.mean()), "b": float(f1_b.mean()), "difference": float(f1_b.mean() - f1_a.mean()),
                     "ci95": list(bootstrap_interval(f1_difference, len(names), resamples=resamples, seed=seed))},
        "per_class_f1": {name: {"n": int((labels == c).sum()), "a": float(f1_a[c]), "b": float(f1_b[c])}
                         for c, name in enumerate(class_names)},
        "right_in_a_only": only_a, "right_in_b_only": only_b,
        # Exact McNemar: under "equally good", each discordant case is a fair coin.
        "mcnemar_exact_p": float(binomtest(only_a, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0,
    }


def fold_breakdown(kind: str, a: dict[str, dict], b: dict[str, dict], names: list[str]) -> list[dict] | None:
    """Per fold, for two cross-validations that dealt the shared cases into the same folds:
    the cases and the mean lesion Dice (segmenters) or accuracy (classifiers) of A and B.
    None otherwise (evaluations of one split, or other fold assignments)."""
    if not all("fold" in a[n] and "fold" in b[n] and a[n]["fold"] == b[n]["fold"] for n in names):
        return None
    folds = []
    for fold in sorted({a[n]["fold"] for n in names}):
        cases = [n for n in names if a[n]["fold"] == fold]
        if kind == "segmenter":
            cases = [n for n in cases if a[n]["lesion"]]
            va, vb = ([r[n]["dice"] for n in cases] for r in (a, b))
        else:
            va, vb = ([float(np.argmax(r[n]["probabilities"]) == r[n]["label"]) for n in cases] for r in (a, b))
        if cases:
            folds.append({"fold": int(fold), "n": len(cases), "a": float(np.mean(va)), "b": float(np.mean(vb)),
                          "difference": float(np.mean(vb) - np.mean(va))})
    return folds


def compare(a: str | os.PathLike, b: str | os.PathLike, *, split: str = "test", resamples: int = 10000,
            seed: int = 0) -> dict[str, Any]:
    """Compares the evaluations ``a`` and ``b`` (paths as ``find_results`` takes them) on the
    cases both scored. Raises ``TfBusError`` for results of different kinds or with no case
    in common."""
    if resamples < 100:
        raise TfBusError(f"`resamples` must be >= 100 for a 95% interval. Received: resamples={resamples}")
    kind_a, rows_a, file_a = load_results(a, split)
    kind_b, rows_b, file_b = load_results(b, split)
    if kind_a != kind_b:
        raise TfBusError(f"{file_a} scores a {kind_a} and {file_b} a {kind_b}; compare like with like.")
    names = sorted(set(rows_a) & set(rows_b))
    if not names:
        raise TfBusError(f"{file_a} and {file_b} share no case name: they scored different data or splits.")
    result: dict[str, Any] = {
        "kind": kind_a, "a": str(file_a), "b": str(file_b), "shared_cases": len(names),
        "only_in_a": len(set(rows_a) - set(rows_b)), "only_in_b": len(set(rows_b) - set(rows_a)),
        "bootstrap": {"resamples": resamples, "seed": seed, "unit": "case"},
    }
    result["folds"] = fold_breakdown(kind_a, rows_a, rows_b, names)
    if kind_a == "segmenter":
        result.update(compare_segmenters(rows_a, rows_b, names, resamples=resamples, seed=seed))
    else:
        from tf_bus.config import CLASS_NAMES

        classes = len(rows_a[names[0]]["probabilities"])
        result.update(compare_classifiers(rows_a, rows_b, names, resamples=resamples, seed=seed,
                                          class_names=list(CLASS_NAMES) if classes == len(CLASS_NAMES) else None))
    return result


def plot_comparison(result: dict[str, Any], path: str | os.PathLike, labels: tuple[str, str] = ("A", "B")) -> None:
    """A PNG: for segmenters, each lesion image's Dice under A against B (points above the
    diagonal are better in B); for classifiers, per-class F1 of A and B side by side."""
    from tf_bus.plots import save_png, subplots

    fig, ax = subplots(figsize=(5.5, 5))
    if result["kind"] == "segmenter":
        dice_a, dice_b = result["_dice"]
        ax.scatter(dice_a, dice_b, s=9, alpha=0.6)
        ax.plot([0, 1], [0, 1], color="grey", lw=1)
        m = result["lesion_images"]["metrics"]["dice"]
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel=f"Dice, {labels[0]}", ylabel=f"Dice, {labels[1]}",
               title=f"{result['lesion_images']['n']} lesion images: mean {m['a']:.3f} vs {m['b']:.3f}\n"
                     f"B - A {m['difference']:+.3f} (95% CI {m['ci95'][0]:+.3f} to {m['ci95'][1]:+.3f})")
    else:
        names = list(result["per_class_f1"])
        x = np.arange(len(names))
        for offset, key, label in ((-0.2, "a", labels[0]), (0.2, "b", labels[1])):
            ax.bar(x + offset, [result["per_class_f1"][n][key] for n in names], width=0.4, label=label)
        m = result["macro_f1"]
        ax.set(xticks=x, xticklabels=names, ylim=(0, 1), ylabel="F1",
               title=f"{result['n']} cases: macro-F1 {m['a']:.3f} vs {m['b']:.3f}\n"
                     f"B - A {m['difference']:+.3f} (95% CI {m['ci95'][0]:+.3f} to {m['ci95'][1]:+.3f})")
        ax.legend()
    save_png(fig, path)


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A few lines for the terminal."""
    lines = [f"A: {result['a']}", f"B: {result['b']}", f"shared cases: {result['shared_cases']}"
             + (f" (only in A: {result['only_in_a']}, only in B: {result['only_in_b']})"
                if result["only_in_a"] or result["only_in_b"] else "")]
    if result["folds"]:
        what = "lesion Dice" if result["kind"] == "segmenter" else "accuracy"
        lines.append(f"per fold ({what}, B-A): " + ", ".join(f"{f['fold']}: {f['a']:.3f}/{f['b']:.3f} "
                                                          f"({f['difference']:+.3f})" for f in result["folds"]))
    if result["kind"] == "segmenter":
        les = result["lesion_images"]
        lines.append(f"lesion images: {les['n']}")
        for key, m in les["metrics"].items():
            lines.append(f"  {key:<9} A {m['a']:.4f}  B {m['b']:.4f}  B-A {m['difference']:+.4f}  "
                         f"95% CI [{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]")
        f = les["failures"]
        lines.append(f"  Dice < 0.5: A {f['a']['dice_below_0.5']}, B {f['b']['dice_below_0.5']}; wrong place: "
                     f"A {f['a']['wrong_place']}, B {f['b']['wrong_place']}; better in A {les['dice_better']['a']}, "
                     f"in B {les['dice_better']['b']}")
        nor = result["normal_images"]
        lines.append(f"normal images: {nor['n']}, predicted empty: A {nor['predicted_empty']['a']}, "
                     f"B {nor['predicted_empty']['b']}")
    else:
        for key in ("accuracy", "macro_f1"):
            m = result[key]
            lines.append(f"{key:<9} A {m['a']:.4f}  B {m['b']:.4f}  B-A {m['difference']:+.4f}  "
                         f"95% CI [{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]")
        lines.append(f"right in A only: {result['right_in_a_only']}, in B only: {result['right_in_b_only']} "
                     f"(McNemar exact p = {result['mcnemar_exact_p']:.3g})")
    return lines


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    """The result without its private arrays (``_dice``), ready for ``json.dumps``."""
    return {k: v for k, v in result.items() if not k.startswith("_")}
