"""Hyperparameter search for the classifier with KerasTuner: `tf-bus tune`.

The search space (``TuneConfig``): learning rate and weight decay on a log scale, batch
size, dropout, unfrozen residual stages (pre-trained weights only), backbone and the
epochs budget. Each trial trains the classifier as `train-classifier` does (same data,
balancing, loss and metrics) and reports validation macro-F1 (``val_f1``).

TUNE_DIR holds:

- ``tune_config.json``: the search that was asked for (a re-run must ask for the same);
- ``classifier/``: KerasTuner's project (oracle state, one ``trial_*`` folder each), so
  that running the same command again resumes the search (``overwrite=False``);
- ``trials.json``: every trial: status, score, epochs trained, hyperparameters, and the
  error of a failed trial;
- ``best_hyperparameters.json``: the best trial's values and score, and the full
  ``ClassifierConfig`` that ``tf-bus tune --retrain RUN_DIR`` (or ``train-classifier``
  with the same flags) trains.

Distributed tuning uses KerasTuner's own protocol: one chief process serves the oracle
and the workers run trials. Start every process with the same command and these
variables: ``KERASTUNER_ORACLE_IP`` / ``KERASTUNER_ORACLE_PORT`` (the chief's address),
``KERASTUNER_TUNER_ID`` (``chief`` for the chief, ``tuner0``, ``tuner1`` … for workers).
TUNE_DIR must be a folder that every process sees (one machine, or a shared file system).

``--strategy multiworker`` is the other way to use several machines: every trial trains
across all the processes in ``TF_CONFIG`` (MultiWorkerMirroredStrategy). Each process runs
its own tuner with the same seed, and the trials' scores are all-reduced, so every tuner
proposes the same trials in the same order. Worker 0 writes TUNE_DIR, the others
TUNE_DIR/workers/<type>-<index>. It cannot be combined with KerasTuner's chief/worker
protocol above.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import keras

from tf_bus.config import ClassifierConfig, TuneConfig
from tf_bus.data.busi import TfBusError
from tf_bus.io import write_bytes_atomic, write_json_atomic
from tf_bus.training.common import settings_changes

PROJECT = "classifier"
OBJECTIVE = "val_f1"


def _tuner_role() -> str:
    """``single``, ``chief`` or ``worker``, from KerasTuner's environment variables."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    missing = [v for v in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID") if not os.environ.get(v)]
    if missing:
        raise TfBusError(
            f"KERASTUNER_ORACLE_IP is set, so this is distributed tuning, but {', '.join(missing)} is not. "
            "Set KERASTUNER_ORACLE_PORT to the chief's port and KERASTUNER_TUNER_ID to `chief` on the chief "
            "and to tuner0, tuner1, ... on the workers."
        )
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def _make_hypermodel(tune: TuneConfig, data: str | os.PathLike, splits_file: str | os.PathLike | None):
    import keras_tuner

    from tf_bus.models.classifier import set_trainable_stages
    from tf_bus.training.classification import build_training_model, classifier_data, compile_classifier
    from tf_bus.training.common import op_determinism

    class ClassifierHyperModel(keras_tuner.HyperModel):
        """Builds and trains one classifier per trial (see the module docstring)."""

        def __init__(self):
            super().__init__(name="busi_classifier", tunable=True)
            self.fits = 0
            self.replicas = None  # of the strategy the last trial trained under

        def declare_hyperparameters(self, hp):
            # The space is known without building a ResNet (KerasTuner's default builds one).
            search_space(tune, hp)

        def config_for(self, hp) -> ClassifierConfig:
            return trial_config(tune, hp)

        def build(self, hp):
            config = self.config_for(hp)
            model = build_training_model(config)
            set_trainable_stages(model, config.fine_tune_stages if config.weights else None)
            # The schedule needs steps per epoch; `fit` recompiles with the real count (and only
            # then builds the optimizer's slots: built here, they would be thrown away).
            compile_classifier(model, config, config.learning_rate, config.epochs, 1, build=False)
            return model

        def fit(self, hp, model, *args, epochs=None, callbacks=None, verbose="auto", **kwargs):
            from tf_bus.training.distribute import check_global_batch

            config = self.config_for(hp)
            strategy = model.distribute_strategy  # KerasTuner built the model under --strategy
            self.replicas = strategy.num_replicas_in_sync
            check_global_batch(config.batch_size, self.replicas)
            d = classifier_data(data, config, splits_file, replicas=self.replicas)
            total = int(epochs) if epochs is not None else config.epochs
            with strategy.scope():
                compile_classifier(model, config, config.learning_rate, total, d.steps)
            self.fits += 1
            with op_determinism(config.deterministic):
                return model.fit(
                    d.train, validation_data=d.validation, class_weight=d.class_weight, shuffle=False,
                    steps_per_epoch=d.steps if d.balance == "sampling" else None, epochs=total,
                    initial_epoch=kwargs.get("initial_epoch", 0), callbacks=callbacks, verbose=verbose,
                )

    return ClassifierHyperModel()


def search_space(tune: TuneConfig, hp) -> dict[str, Any]:
    """Declares the search space on ``hp`` and returns the values of this trial."""
    def rng(name, lo, hi, **kw):
        if lo == hi:
            return hp.Fixed(name, lo)
        return (hp.Float if isinstance(lo, float) else hp.Int)(name, lo, hi, **kw)

    v = {
        "learning_rate": rng("learning_rate", *tune.learning_rate_range, sampling="log"),
        "weight_decay": rng("weight_decay", *tune.weight_decay_range, sampling="log"),
        "dropout": rng("dropout", *tune.dropout_range),
        "batch_size": hp.Choice("batch_size", list(tune.batch_sizes)),
        "backbone": hp.Choice("backbone", list(tune.backbones)),
    }
    if tune.base.weights:
        v["fine_tune_stages"] = rng("fine_tune_stages", *tune.fine_tune_stages_range)
    if tune.tuner != "hyperband":  # Hyperband allots epochs itself (tuner/epochs)
        v["epochs"] = rng("epochs", *tune.epochs_range, step=tune.epochs_step)
    return v


def trial_config(tune: TuneConfig, hp) -> ClassifierConfig:
    """The classifier config of one trial: ``tune.base`` with the trial's values.

    With pre-trained weights a trial trains the top ``fine_tune_stages`` stages at the
    trial's learning rate from the start (no separate head phase, to keep trials short);
    the retrained best configuration runs both phases, with ``fine_tune_learning_rate``
    set to the trial's learning rate.
    """
    values = search_space(tune, hp)
    if "tuner/epochs" in hp.values:
        values["epochs"] = hp.values["tuner/epochs"]
    values.setdefault("epochs", tune.epochs_range[1])
    base = tune.base
    over = dict(values)
    if base.weights:
        over["fine_tune_learning_rate"] = over["learning_rate"]
    return dataclasses.replace(base, **over)


def _atomic_keras_tuner_json() -> None:
    """KerasTuner writes ``oracle.json`` and each ``trial.json`` by truncating the file and
    then writing it: a search killed in between left an empty file, and the next run's
    resume died inside KerasTuner on a ``JSONDecodeError``. Its one JSON writer
    (``keras_tuner.src.utils.save_json``, which every state file goes through) is replaced
    by one that writes a temporary file and renames it, for local paths (others, such as
    ``gs://``, keep KerasTuner's own). Idempotent."""
    from keras_tuner.src import utils as kt_utils

    original = kt_utils.save_json
    if getattr(original, "tf_bus_atomic", False):
        return

    def save_json(path, obj):
        if "://" in str(path):
            return original(path, obj)
        text = json.dumps(obj)
        write_bytes_atomic(path, text.encode())
        return text

    save_json.tf_bus_atomic = True
    kt_utils.save_json = save_json


def unreadable_search_files(project: Path) -> list[Path]:
    """The JSON files of a KerasTuner project that do not parse (cut off by a kill under an
    earlier version of tf-bus or KerasTuner); empty when the search can be resumed."""
    bad = []
    for f in [project / "oracle.json", *sorted(project.glob("trial_*/*.json"))]:
        try:
            if f.is_file():
                json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError):
            bad.append(f)
    return bad


def _make_tuner(tune: TuneConfig, hypermodel, out: Path, overwrite: bool, strategy=None):
    """The KerasTuner tuner; it builds each trial's model under ``strategy`` (--strategy)."""
    import keras_tuner

    _atomic_keras_tuner_json()
    if not overwrite and (bad := unreadable_search_files(out / PROJECT)):
        raise TfBusError(f"{out}: the search cannot be resumed, {len(bad)} of its files were cut off mid-write "
                         f"({', '.join(str(b) for b in bad[:3])}; tf-bus now writes them whole). Pass --overwrite to "
                         "start the search afresh, or another --out.")
    objective = keras_tuner.Objective(OBJECTIVE, direction="max")
    common = dict(objective=objective, executions_per_trial=tune.executions_per_trial, overwrite=overwrite,
                  directory=str(out), project_name=PROJECT, seed=tune.base.seed, max_consecutive_failed_trials=3,
                  distribution_strategy=strategy)
    if tune.tuner == "random":
        return keras_tuner.RandomSearch(hypermodel, max_trials=tune.max_trials, **common)
    if tune.tuner == "bayesian":
        return keras_tuner.BayesianOptimization(hypermodel, max_trials=tune.max_trials, **common)
    return keras_tuner.Hyperband(hypermodel, max_epochs=tune.epochs_range[1], factor=tune.hyperband_factor,
                                 max_retries_per_trial=0, **common)


def _trial_records(tuner) -> list[dict[str, Any]]:
    records = []
    for trial in sorted(tuner.oracle.trials.values(), key=lambda t: t.trial_id):
        history = trial.metrics.get_history("loss") if trial.metrics.exists("loss") else []
        message = (trial.message or "").strip().splitlines()
        records.append({
            "trial_id": trial.trial_id,
            "status": str(trial.status),
            "score": None if trial.score is None else float(trial.score),
            "best_step": trial.best_step,
            "epochs_trained": len(history),
            "hyperparameters": dict(trial.hyperparameters.values),
            "error": message[-1] if message else None,
        })
    return records


def _summarise(tune: TuneConfig, tuner, out: Path, wall: float, replicas: int | None = None) -> dict[str, Any]:
    records = _trial_records(tuner)
    write_json_atomic(out / "trials.json", {"objective": OBJECTIVE, "direction": "max", "trials": records})
    done = [r for r in records if r["status"] == "COMPLETED" and r["score"] is not None and r["epochs_trained"] > 0]
    if not done:
        errors = [r["error"] for r in records if r["error"]]
        raise TfBusError(
            f"tuning ran {len(records)} trial(s) and none trained (no trial recorded {OBJECTIVE}). "
            + (f"The first error: {errors[0]}. " if errors else "")
            + f"Each trial's status and error are in {out / 'trials.json'}."
        )
    # The highest score; among equal scores the earliest trial, so that a resumed search
    # names the same best trial (KerasTuner's own order of ties is not stable).
    top = max(r["score"] for r in done)
    best_trial = tuner.oracle.get_trial(next(r["trial_id"] for r in done if r["score"] == top))
    best_config = trial_config(tune, best_trial.hyperparameters)
    best = {
        "objective": OBJECTIVE, "direction": "max", "tuner": tune.tuner,
        "score": float(best_trial.score), "trial_id": best_trial.trial_id,
        "values": dict(best_trial.hyperparameters.values),
        "config": json.loads(json.dumps(best_config.to_dict())),
        "trials_completed": len(done), "trials_total": len(records), "wall_seconds": round(wall, 1),
        "strategy": tune.base.strategy, "replicas": replicas,
    }
    write_json_atomic(out / "best_hyperparameters.json", best)
    return best


def tune_classifier(
    data: str | os.PathLike,
    out: str | os.PathLike,
    tune: TuneConfig | None = None,
    *,
    splits_file: str | os.PathLike | None = None,
    overwrite: bool = False,
    retrain_dir: str | os.PathLike | None = None,
    verbose: int | str = 1,
) -> dict[str, Any]:
    """Runs (or resumes) the search and writes TUNE_DIR (see the module docstring).

    Args:
        data: a `tf-bus prepare` output, its classification layout, or the raw release.
        out: TUNE_DIR. An earlier search there with the same settings is resumed.
        tune: the search settings.
        splits_file: with a raw release, the split to use.
        overwrite: start the search afresh (KerasTuner's ``overwrite=True``).
        retrain_dir: train the best configuration into this RUN_DIR afterwards.
        verbose: KerasTuner / Keras verbosity.

    Returns:
        The content of ``best_hyperparameters.json`` (chief or single process) plus, with
        ``retrain_dir``, the retraining summary. A worker returns ``{"role": "worker",
        "tuner_id": ID, "fits_run": N}``.

    Raises:
        TfBusError: no trial trained, another search in TUNE_DIR, bad distributed
            settings.
    """
    from tf_bus.training.precision import precision_policy

    from tf_bus.training.distribute import make_strategy, worker_run_dir

    tune = tune or TuneConfig()
    role = _tuner_role()  # reads the environment only
    if role != "single" and tune.base.strategy == "multiworker":
        raise TfBusError("--strategy multiworker runs every trial across the TF_CONFIG workers, each with its own "
                         "tuner; it cannot be combined with KerasTuner's distributed tuning. Unset "
                         "KERASTUNER_ORACLE_IP (and KERASTUNER_ORACLE_PORT, KERASTUNER_TUNER_ID), or use another "
                         "--strategy.")
    # Before TensorFlow runs any op: a multi-worker strategy must be created first.
    strategy = make_strategy(tune.base.strategy) if tune.base.strategy != "default" else None
    out = worker_run_dir(Path(out).expanduser().resolve(), tune.base.strategy)
    record = {"tune": json.loads(json.dumps(tune.to_dict())), "data": str(Path(data).expanduser().resolve()),
              "splits_file": str(splits_file) if splits_file else None}
    saved = out / "tune_config.json"

    def search(r: dict) -> dict:  # more (or fewer) trials may be asked for on resuming
        return {**r, "tune": {k: v for k, v in r["tune"].items() if k != "max_trials"}}

    if role != "worker":
        before = search(json.loads(saved.read_text())) if saved.exists() and not overwrite else None
        if before is not None and before != search(record):
            changes = settings_changes(before, search(record))
            raise TfBusError(f"{out}: holds a search with other settings or data ({changes}). Repeat its flags "
                             "to resume it, pass --overwrite to start afresh, or pass another --out.")
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(saved, record)
        if overwrite:
            for name in ("trials.json", "best_hyperparameters.json"):
                (out / name).unlink(missing_ok=True)
    with precision_policy(tune.base.precision):
        keras.utils.set_random_seed(tune.base.seed)
        hypermodel = _make_hypermodel(tune, data, splits_file)
        # Only the chief (or a single process) may reset the project; workers join it.
        tuner = _make_tuner(tune, hypermodel, out, overwrite and role != "worker", strategy)
        t0 = time.perf_counter()
        try:
            # KerasTuner gives each trial its own TensorBoard folder under logs/.
            tuner.search(callbacks=[keras.callbacks.TensorBoard(str(out / "logs"))], verbose=verbose)
        except RuntimeError as e:  # KerasTuner gives up after max_consecutive_failed_trials
            if role == "worker" or "consecutive failures" not in str(e).lower():
                raise
    wall = time.perf_counter() - t0
    if role == "worker":
        return {"role": "worker", "tuner_id": os.environ["KERASTUNER_TUNER_ID"], "fits_run": hypermodel.fits}
    best = _summarise(tune, tuner, out, wall, hypermodel.replicas)
    best.update(role=role, fits_run_now=hypermodel.fits)
    if retrain_dir is not None:
        from tf_bus.training.classification import train_classifier

        best["retrained"] = train_classifier(data, retrain_dir, ClassifierConfig.from_dict(best["config"]),
                                             splits_file=splits_file, overwrite=overwrite, verbose=verbose)
        best["retrained"]["run_dir"] = str(Path(retrain_dir).expanduser().resolve())
    return best
