"""`tf-bus tune`: real KerasTuner searches over tiny ResNets (32 px, 1 epoch per trial)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import keras
import pytest

from conftest import TEST_BACKBONE, backbone_weights
from tf_bus.config import ClassifierConfig, ConfigError, TuneConfig
from tf_bus.data.busi import TfBusError
from tf_bus.training.tuning import PROJECT, tune_classifier, unreadable_search_files

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A local backbone weights file (resnet14, ``TEST_BACKBONE``). Trials fine-tune its top
    stage: the path users with ImageNet weights take, and 5x quicker to trace than a
    whole-ResNet backward pass (from-scratch training is tested in test_train_classifier.py)."""
    return str(backbone_weights(tmp_path_factory.mktemp("weights") / "backbone.weights.h5"))


def tiny(weights=None, **kw) -> TuneConfig:
    base = ClassifierConfig(backbone=TEST_BACKBONE, image_size=(32, 32), epochs=1, warmup_epochs=0,
                            time_budget_minutes=0, early_stopping_patience=0, weights=weights)
    cfg = dict(base=base, max_trials=2, backbones=(TEST_BACKBONE,), batch_sizes=(8, 16), epochs_range=(1, 1),
               learning_rate_range=(1e-4, 1e-2), fine_tune_stages_range=(1, 1))
    return TuneConfig(**{**cfg, **kw})


def trials(out) -> list[dict]:
    return json.loads((out / "trials.json").read_text())["trials"]


def assert_trials_trained(records, n, epochs=1):
    """Proof that the trials trained: each has a score and a recorded epoch history."""
    assert len(records) == n
    for r in records:
        assert r["status"] == "COMPLETED", r
        assert r["score"] is not None and 0.0 <= r["score"] <= 1.0, r
        assert r["epochs_trained"] == epochs, r
        assert r["error"] is None


def test_random_search_trains_each_trial_resumes_and_retrains_the_best(prepared, tmp_path, weights):
    out = tmp_path / "tune"
    first = tune_classifier(prepared, out, tiny(weights, max_trials=1), verbose=0)
    assert first["fits_run_now"] == 1
    assert_trials_trained(trials(out), 1)
    # Resumed with one more trial asked for: exactly one more runs, the first is kept.
    best = tune_classifier(prepared, out, tiny(weights, max_trials=2), verbose=0)
    assert best["fits_run_now"] == 1
    records = trials(out)
    assert_trials_trained(records, 2)
    assert records[0]["score"] == first["score"]
    assert best["score"] == max(r["score"] for r in records) and best["trials_completed"] == 2
    saved = json.loads((out / "best_hyperparameters.json").read_text())
    assert saved["values"] == best["values"]
    assert 1e-4 <= saved["values"]["learning_rate"] <= 1e-2 and saved["values"]["batch_size"] in (8, 16)
    cfg = ClassifierConfig.from_dict(saved["config"])
    assert cfg.learning_rate == saved["values"]["learning_rate"] and cfg.batch_size == saved["values"]["batch_size"]
    # TensorBoard logs, one folder per trial.
    assert len([p for p in (out / "logs").iterdir() if p.is_dir()]) == 2
    # The same command again: nothing re-runs; --retrain trains the best configuration into a run folder.
    again = tune_classifier(prepared, out, tiny(weights, max_trials=2), retrain_dir=tmp_path / "best_run", verbose=0)
    assert again["fits_run_now"] == 0 and len(trials(out)) == 2
    run = json.loads((tmp_path / "best_run" / "config.json").read_text())
    assert run["config"] == saved["config"]
    assert keras.saving.load_model(tmp_path / "best_run" / "best.keras").output_shape == (None, 3)
    with pytest.raises(TfBusError, match=r"other settings or data \(tune.batch_sizes: \[8, 16\] in it, \[4\] now\)"):
        tune_classifier(prepared, out, tiny(weights, batch_sizes=(4,)), verbose=0)
    # Every KerasTuner state file is whole (written through a temporary file and renamed).
    project = out / PROJECT
    assert unreadable_search_files(project) == [] and not list(project.rglob("*.tmp"))
    # A search whose files an earlier version left cut off is named, not a JSONDecodeError inside KerasTuner.
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    [trial_file, *_] = sorted((broken / PROJECT).glob("trial_*/trial.json"))
    trial_file.write_text(trial_file.read_text()[:40])
    with pytest.raises(TfBusError, match=rf"cannot be resumed, 1 of its files were cut off mid-write \({trial_file};"):
        tune_classifier(prepared, broken, tiny(weights, max_trials=2), verbose=0)


def test_keras_tuner_state_files_survive_a_kill_mid_write(tmp_path):
    """KerasTuner's JSON writer, as tf-bus installs it: a process killed while it rewrites a
    state file (20 MB, over and over; killed after 0.3 s, then 0.8 s) leaves a whole file, never an
    empty or cut-off one (KerasTuner's own writer truncates first)."""
    path = tmp_path / "oracle.json"
    path.write_text(json.dumps({"generation": 0}))
    child = ("import sys; from tf_bus.training.tuning import _atomic_keras_tuner_json; _atomic_keras_tuner_json(); "
             "from keras_tuner.src import utils; print('ready', flush=True); sys.stdin.readline(); "
             f"[utils.save_json({str(path)!r}, {{'generation': g, 'pad': 'x' * 20_000_000}}) for g in range(1, 1000)]")
    seen = []
    for delay in (0.3, 0.8):
        p = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        p.stdin.write("go\n")
        p.stdin.flush()
        time.sleep(delay)
        p.kill()
        p.wait()
        seen.append(json.loads(path.read_text())["generation"])  # parses: never cut off
    assert max(seen) >= 1  # the kills landed after whole rewrites, not only before the first
    # Beside it, at most the temporaries of killed writers, never read as state.
    assert all(f.name == "oracle.json" or (f.name.startswith(".oracle.json.") and f.suffix == ".tmp")
               for f in tmp_path.iterdir())


def test_deterministic_searches_score_their_trials_alike(prepared, tmp_path, weights):
    base = dataclasses.replace(tiny(weights).base, deterministic=True, mixup=0.2)
    seen = []
    for k in range(2):
        out = tmp_path / f"tune{k}"
        tune_classifier(prepared, out, tiny(weights, base=base, max_trials=1), verbose=0)
        [record] = trials(out)
        assert_trials_trained([record], 1)
        # KerasTuner's own record of the trial: every metric's value, losses included.
        [trial_file] = (out / PROJECT).glob("trial_*/trial.json")
        metrics = json.loads(trial_file.read_text())["metrics"]["metrics"]
        assert {"loss", "val_loss"} <= set(metrics)
        seen.append((record["hyperparameters"], record["score"], metrics))
    assert seen[0] == seen[1]


@pytest.mark.parametrize("tuner", ["hyperband", "bayesian"])
def test_other_tuners_train_their_trials(prepared, tmp_path, tuner, weights):
    out = tmp_path / tuner
    best = tune_classifier(prepared, out, tiny(weights, tuner=tuner, max_trials=1), verbose=0)
    assert_trials_trained(trials(out), 1)
    if tuner == "hyperband":  # Hyperband allots the epochs (max_epochs 1 -> one trial of one epoch)
        assert best["values"]["tuner/epochs"] == 1 and "epochs" not in best["values"]
    else:
        assert best["values"]["epochs"] == 1
    assert best["config"]["epochs"] == 1


def test_a_search_whose_trials_all_fail_is_an_error_not_a_best_result(prepared, tmp_path):
    """Without the tensorboard package every KerasTuner trial fails and search() returns
    at once; tf-bus must say so instead of reporting a "best" set."""
    blocker = tmp_path / "no_tensorboard" / "tensorboard"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("No module named tensorboard (blocked by the test)")\n')
    out = tmp_path / "tune"
    r = subprocess.run([sys.executable, "-m", "tf_bus.cli", "tune", "--data", str(prepared), "--out", str(out),
                        "--max-trials", "2", "--image-size", "32", "--backbones", TEST_BACKBONE, "--epochs-range", "1",
                        "--quiet"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(blocker.parent), "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]  # KerasTuner prints each failed trial's traceback before
    assert last.startswith("tf-bus tune: error:") and "none trained" in last and "tensorboard" in last, last
    records = trials(out)
    assert len(records) == 2 and all(r["status"] != "COMPLETED" and "tensorboard" in r["error"] for r in records)
    assert not (out / "best_hyperparameters.json").exists()


def test_corrupt_weights_fail_before_the_first_trial(prepared, tmp_path):
    bad = tmp_path / "corrupt.weights.h5"
    bad.write_bytes(b"not an HDF5 file" * 64)
    with pytest.raises(TfBusError, match=f"corrupt.weights.h5: cannot load it as {TEST_BACKBONE} backbone weights"):
        tune_classifier(prepared, tmp_path / "tune", tiny(base=ClassifierConfig(image_size=(32, 32), weights=str(bad))),
                        verbose=0)


@pytest.mark.parametrize("kwargs,field", [
    (dict(tuner="grid"), "tuner"), (dict(learning_rate_range=(0.0, 1e-2)), "learning_rate_range"),
    (dict(epochs_range=(3, 2)), "epochs_range"), (dict(backbones=("vgg",)), "backbones"),
    (dict(dropout_range=(0.1, 1.0)), "dropout_range"), (dict(batch_sizes=()), "batch_sizes"),
    (dict(base=ClassifierConfig(weights="imagenet"), backbones=("resnet50", "resnet26")), "imagenet.*resnet26"),
])
def test_bad_tune_config(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        TuneConfig(**kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_tuning_chief_and_two_workers(prepared, tmp_path, weights):
    out = tmp_path / "tune"
    port = _free_port()
    cmd = [sys.executable, "-m", "tf_bus.cli", "tune", "--data", str(prepared), "--out", str(out),
           "--max-trials", "2", "--image-size", "32", "--backbones", TEST_BACKBONE, "--batch-sizes", "8",
           "--epochs-range", "1", "--weights", weights, "--fine-tune-stages-range", "1", "--quiet"]
    base_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERASTUNER_ORACLE_IP": "127.0.0.1",
                "KERASTUNER_ORACLE_PORT": str(port), "CUDA_VISIBLE_DEVICES": ""}
    procs = {}
    for tid in ("chief", "tuner0", "tuner1"):
        procs[tid] = subprocess.Popen(cmd, env={**base_env, "KERASTUNER_TUNER_ID": tid}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
    outputs = {}
    try:
        for tid, p in procs.items():
            outputs[tid] = p.communicate(timeout=600)[0]
    finally:
        for p in procs.values():
            p.kill()
    for tid, p in procs.items():
        assert p.returncode == 0, f"{tid}:\n{outputs[tid][-3000:]}"
    fits = [json.loads(outputs[t][outputs[t].index("{"):outputs[t].rindex("}") + 1])["fits_run"]
            for t in ("tuner0", "tuner1")]
    assert sum(fits) == 2, fits
    assert_trials_trained(trials(out), 2)
    assert json.loads((out / "best_hyperparameters.json").read_text())["trials_completed"] == 2


def test_half_set_distributed_environment_is_a_clear_error(prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.delenv("KERASTUNER_ORACLE_PORT", raising=False)
    monkeypatch.delenv("KERASTUNER_TUNER_ID", raising=False)
    with pytest.raises(TfBusError, match="KERASTUNER_ORACLE_PORT"):
        tune_classifier(prepared, tmp_path / "t", tiny(), verbose=0)
