"""Seed ensembles: `tf-bus train-segmenter|train-classifier --ensemble K`.

K runs of one trainer on the same split, seeds ``seed``, ``seed + 1``, ... (weights,
shuffling and augmentation differ), served and evaluated as one model whose output is the
mean of theirs (``tf_bus.export.fold_ensemble``). The test split stays held out of every
member, so ``evaluate-segmenter RUN_DIR --split test`` scores the ensemble honestly. On
BUSI a bag of 4 default U-Nets scored +0.019 mean Dice over its members alone (README,
"A seed ensemble").

RUN_DIR after a run::

    config.json           the trainer config, data, split file and ensemble size
    member_<k>/           a complete run folder (config.json with seed + k, best.keras, ...)
    threshold.json        (segmenter) the threshold and post-processing chosen for the
                          averaged maps on the validation split
    eval_validation/      the ensemble scored on the validation split
    ensemble.json         each member's best validation score and the ensemble's

Starting the same command again resumes: finished members are kept, an unfinished member
resumes from its last epoch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tf_bus.config import ClassifierConfig, SegmenterConfig
from tf_bus.data.busi import TfBusError
from tf_bus.io import write_json_atomic
from tf_bus.training.common import claim_folder, run_finished

SUMMARY = "ensemble.json"


def train_ensemble(
    kind: str,
    data,
    run_dir,
    config: SegmenterConfig | ClassifierConfig,
    *,
    members: int = 4,
    splits_file=None,
    tta: bool = True,
    overwrite: bool = False,
    verbose: int | str = "auto",
) -> dict[str, Any]:
    """Trains ``members`` runs of one trainer, seeds ``config.seed + k``; writes RUN_DIR
    (module docstring).

    Args:
        kind: ``segmenter`` or ``classifier``.
        data: what the trainer takes (a `tf-bus prepare` output, a layout, the raw release).
        run_dir: output folder; an unfinished ensemble there is resumed.
        config: the trainer's config; each member gets ``seed + k``, and
            ``time_budget_minutes`` applies to each member.
        members: K >= 2.
        splits_file: the split every member trains on (default: the data's, as one run).
        tta: flip test-time augmentation when scoring the ensemble on validation (and, for
            the segmenter, choosing its threshold and post-processing there).
        overwrite: replace what ``run_dir`` holds; without it, an ensemble with the same
            settings resumes and one with other settings is refused.

    Returns:
        What ``ensemble.json`` holds: ``members`` (each one's seed and best validation
        score) and ``validation`` (the ensemble's aggregate on the validation split).
    """
    from tf_bus.evaluation import evaluate_classifier, evaluate_segmenter

    if kind not in ("segmenter", "classifier"):
        raise TfBusError(f"`kind` must be segmenter or classifier. Received: kind={kind!r}")
    if not isinstance(members, int) or members < 2:
        raise TfBusError(f"--ensemble must be at least 2 (one run is the default). Received: {members!r}")
    run_dir = Path(run_dir).expanduser().resolve()
    record = {"kind": kind, "config": json.loads(json.dumps(config.to_dict())),
              "data": str(Path(data).expanduser().resolve()),
              "splits": str(Path(splits_file).expanduser().resolve()) if splits_file else None,
              "ensemble": members, "seeds": [config.seed + k for k in range(members)], "tta": tta}
    claim_folder(run_dir, record, overwrite=overwrite, what="a run",
                 stale=("member_*", "eval_*", SUMMARY, "threshold.json"))

    if kind == "segmenter":
        from tf_bus.training.segmentation import train_segmenter as train
    else:
        from tf_bus.training.classification import train_classifier as train
    rows = []
    for k in range(members):
        member_dir = run_dir / f"member_{k}"
        member_config = dataclasses.replace(config, seed=config.seed + k)
        if not run_finished(member_dir):
            print(f"ensemble: member {k + 1} of {members} (seed {member_config.seed}) -> {member_dir}", flush=True)
            restart = (member_dir / "config.json").exists() and not (member_dir / "backup").exists()
            train(data, member_dir, member_config, splits_file=splits_file, overwrite=restart, verbose=verbose)
            (run_dir / SUMMARY).unlink(missing_ok=True)
        fit = json.loads((member_dir / "history.json").read_text()).get("summary", {})
        rows.append({"member": k, "seed": member_config.seed,
                     **{key: value for key, value in fit.items() if key.startswith("best_val_")}})
    if (run_dir / SUMMARY).exists():
        return json.loads((run_dir / SUMMARY).read_text())
    if kind == "segmenter":
        result = evaluate_segmenter(run_dir, data, "validation", tta=tta, choose_on_validation=True,
                                    splits_file=splits_file)
        validation = result["aggregate"]
    else:
        result = evaluate_classifier(run_dir, data, "validation", tta=tta, splits_file=splits_file)
        validation = {key: result[key] for key in ("accuracy", "macro_f1", "macro_roc_auc_ovr") if key in result}
    summary = {"members": rows, "validation": validation, "settings": record}
    write_json_atomic(run_dir / SUMMARY, summary)
    return summary
