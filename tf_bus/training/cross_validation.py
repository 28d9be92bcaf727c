"""K-fold cross-validation of either trainer: `tf-bus train-segmenter|train-classifier --folds K`.

One held-out split of BUSI holds 72 lesion images (87 cases): one standard error of a
mean Dice is about 0.03, of an accuracy about 0.05, and the validation and test splits of
one seed disagree by more than that. Cross-validation tests every case once. The
duplicate groups of the split (``splits.json``) are dealt into K class-stratified folds,
whole groups at a time (``tf_bus.data.split.cross_validation_plans``), so no lesion is in
training and test of one fold. Fold k trains on the other folds less a validation share
(which picks the checkpoint, and the segmenter's threshold), and is scored on fold k with
the evaluate commands' protocol.

CV_DIR after a run::

    config.json                the trainer config, data, folds and validation share
    fold_<k>/                  a complete run folder (config.json, best.keras, ...) with
                               its splits.json and eval_test/metrics.json
    cross_validation.json      every case's test metrics (with its fold), the pooled
                               aggregate over all cases, and each fold's scores

Starting the same command again resumes: finished folds are kept, an unfinished fold
resumes from its last epoch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from tf_bus.config import ClassifierConfig, SegmenterConfig
from tf_bus.data.busi import TfBusError
from tf_bus.io import write_json_atomic
from tf_bus.training.common import claim_folder, run_finished

#: The fold scores reported for each trainer, from its eval_test/metrics.json.
FOLD_SCORES = {
    "segmenter": ("dice", "jaccard", "tpr", "fpr", "precision"),
    "classifier": ("accuracy", "macro_f1", "macro_roc_auc_ovr"),
}


def _release_and_plan(data, splits_file):
    """The raw release and the split whose duplicate groups the folds keep together."""
    from tf_bus.data.busi import read_release
    from tf_bus.data.layouts import prepared_source
    from tf_bus.data.pipeline import detect_layout
    from tf_bus.data.split import load_splits, make_split

    data = Path(data).expanduser().resolve()
    source = prepared_source(data)
    if source is not None and (data / "splits.json").exists():  # a `tf-bus prepare` output
        if not source.is_dir():
            raise TfBusError(f"{data}: cross-validation re-splits the raw release, and this prepared folder's "
                             f"source {source} is gone. Pass the Dataset_BUSI_with_GT folder as --data.")
        return source, load_splits(splits_file or data / "splits.json")
    kind, root = detect_layout(data, "segmentation")
    if kind != "release":
        raise TfBusError(f"{data}: cross-validation re-splits the cases, so --data must be a raw BUSI release "
                         "(Dataset_BUSI_with_GT) or a `tf-bus prepare` output, not a split layout.")
    return root, load_splits(splits_file) if splits_file else make_split(read_release(root).infos)


def cross_validate(
    kind: str,
    data,
    cv_dir,
    config: SegmenterConfig | ClassifierConfig,
    *,
    folds: int = 5,
    validation: float = 0.10,
    splits_file=None,
    tta: bool = True,
    overwrite: bool = False,
    verbose: int | str = "auto",
) -> dict[str, Any]:
    """Trains and scores ``folds`` runs of one trainer; writes CV_DIR (module docstring).

    Args:
        kind: ``segmenter`` or ``classifier``.
        data: a raw BUSI release, or a `tf-bus prepare` output (its source release and
            its ``splits.json`` are used).
        cv_dir: output folder; an unfinished cross-validation there is resumed.
        config: the trainer's config, the same for every fold.
        folds: K >= 2.
        validation: each fold's validation share of all cases (0.10 with 5 folds trains on
            70% of the cases, as the default split does).
        splits_file: the split whose duplicate groups are kept whole (default: the
            prepared folder's, or computed as `tf-bus prepare` does).
        tta: flip test-time augmentation when scoring (and, for the segmenter, when
            choosing the threshold and post-processing on validation).
        overwrite: replace what ``cv_dir`` holds (its folds are trained again); without
            it, a cross-validation with the same settings resumes and one with other
            settings is refused.

    Returns:
        What ``cross_validation.json`` holds: ``pooled`` (the evaluate command's aggregate
        over every case, each scored by the fold that held it out), ``folds`` (each
        fold's scores), ``fold_mean`` / ``fold_std``, ``per_image``.
    """
    from tf_bus.data.split import cross_validation_plans, save_splits
    from tf_bus.evaluation import evaluate_classifier, evaluate_segmenter

    if kind not in FOLD_SCORES:
        raise TfBusError(f"`kind` must be segmenter or classifier. Received: kind={kind!r}")
    release, plan = _release_and_plan(data, splits_file)
    plans = cross_validation_plans(plan, folds, validation=validation)
    cv_dir = Path(cv_dir).expanduser().resolve()
    record = {"kind": kind, "config": json.loads(json.dumps(config.to_dict())), "data": str(release),
              "folds": folds, "validation": validation, "tta": tta}
    claim_folder(cv_dir, record, overwrite=overwrite, what="a cross-validation",
                 stale=("fold_*", "cross_validation.json"))

    if kind == "segmenter":
        from tf_bus.training.segmentation import train_segmenter as train
    else:
        from tf_bus.training.classification import train_classifier as train
    results = []
    for k, fold_plan in enumerate(plans):
        fold_dir = cv_dir / f"fold_{k}"
        fold_dir.mkdir(exist_ok=True)
        splits = fold_dir / "splits.json"
        if not splits.exists():
            save_splits(fold_plan, splits)
        metrics = fold_dir / "eval_test" / "metrics.json"
        if not run_finished(fold_dir):
            print(f"cross-validation: fold {k + 1} of {folds} -> {fold_dir}", flush=True)
            restart = (fold_dir / "config.json").exists() and not (fold_dir / "backup").exists()
            train(release, fold_dir, config, splits_file=splits, overwrite=restart, verbose=verbose)
            metrics.unlink(missing_ok=True)
        if not metrics.exists():
            if kind == "segmenter":
                evaluate_segmenter(fold_dir, release, "test", tta=tta, choose_on_validation=True, splits_file=splits)
            else:
                evaluate_classifier(fold_dir, release, "test", tta=tta, splits_file=splits)
        results.append(json.loads(metrics.read_text()))
    summary = summarise(kind, results)
    summary["settings"] = record
    write_json_atomic(cv_dir / "cross_validation.json", summary)
    return summary


def summarise(kind: str, fold_results: list[dict[str, Any]]) -> dict[str, Any]:
    """Pools the folds' ``eval_test/metrics.json`` (one per fold, in fold order)."""
    from tf_bus.evaluation import aggregate_mask_metrics, classification_metrics

    per_image = [{**r, "fold": k} for k, res in enumerate(fold_results) for r in res["per_image"]]
    folds = []
    for k, res in enumerate(fold_results):
        if kind == "segmenter":
            lesion = res["aggregate"]["lesion_images"]
            scores = {m: lesion[m].get("mean") for m in FOLD_SCORES[kind]}
            scores.update(threshold=res["settings"]["threshold"], postprocess=res["settings"]["postprocess"],
                          lesion_images=lesion["n"], normal_images=res["aggregate"]["normal_images"]["n"])
        else:
            scores = {m: res[m] for m in FOLD_SCORES[kind]}
            scores["cases"] = len(res["per_image"])
        folds.append({"fold": k, **scores})
    if kind == "segmenter":
        pooled = aggregate_mask_metrics(per_image)
    else:
        pooled = classification_metrics([r["label"] for r in per_image], [r["probabilities"] for r in per_image])
    fold_mean, fold_std = {}, {}
    for m in FOLD_SCORES[kind]:
        values = [f[m] for f in folds if f[m] is not None and not (isinstance(f[m], float) and math.isnan(f[m]))]
        fold_mean[m] = float(np.mean(values)) if values else None
        fold_std[m] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"pooled": pooled, "folds": folds, "fold_mean": fold_mean, "fold_std": fold_std, "per_image": per_image}
