"""--strategy multiworker: two worker processes on 127.0.0.1 configured by TF_CONFIG.

Each test starts real `tf-bus train-segmenter` processes (MultiWorkerMirroredStrategy,
collective all-reduce over gRPC) on free ports, with bounded timeouts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_BACKBONE
from tf_bus.config import ConfigError
from tf_bus.training.distribute import parse_tf_config, task_info

REPO = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "32,32", "--depth", "2", "--base-filters", "4", "--batch-size", "8", "--quiet",
        "--warmup-epochs", "0", "--time-budget", "0", "--strategy", "multiworker"]


@pytest.mark.parametrize("text, field", [
    (None, "needs TF_CONFIG"),
    ("{not json", "not valid JSON"),
    ('{"task": {"type": "worker", "index": 0}}', '"cluster"'),
    ('{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}', "non-empty"),
    ('{"cluster": {"worker": ["nohostport"]}, "task": {"type": "worker", "index": 0}}', "host:port"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "ps", "index": 0}}', '"task"'),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}', "task.index must be 0..1"),
])
def test_malformed_tf_config_is_named(text, field):
    with pytest.raises(ConfigError, match=field):
        parse_tf_config(text)


@pytest.mark.parametrize("cfg, expected", [
    ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}, ("worker", 0, True)),
    ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}, ("worker", 1, False)),
    ({"cluster": {"chief": ["c:0"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}, ("worker", 0, False)),
    ({"cluster": {"chief": ["c:0"], "worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}, ("chief", 0, True)),
])
def test_the_chief_writes_run_dir(monkeypatch, cfg, expected):
    monkeypatch.setenv("TF_CONFIG", json.dumps(cfg))
    assert task_info() == expected


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _start_workers(prepared: Path, run: Path, epochs: int, tmp: Path, tag: str, n: int = 2, start: int | None = None,
                   env_extra: dict | None = None, command: list[str] | None = None) -> list[subprocess.Popen]:
    """``n`` worker processes of one TF_CONFIG cluster (only worker ``start`` if given),
    running ``command`` (default: a tiny train-segmenter into ``run``)."""
    command = command or ["train-segmenter", "--data", str(prepared), "--out", str(run), "--epochs", str(epochs),
                          *TINY]
    ports = _ports(n)
    procs = []
    for i in range(n) if start is None else [start]:
        env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2",
               "TF_BUS_HEARTBEAT_TIMEOUT": "10", "TF_BUS_JOIN_TIMEOUT": "60", **(env_extra or {}),
               "TF_CONFIG": json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                        "task": {"type": "worker", "index": i}})}
        log = open(tmp / f"{tag}-worker{i}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tf_bus.cli", *command], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            codes.append(p.wait())
    return codes


def _weights(path: Path) -> list[np.ndarray]:
    import keras

    import tf_bus.models  # noqa: F401  (registers the custom objects)

    return keras.saving.load_model(path).get_weights()


def _epochs(csv: Path) -> list[int]:
    return [int(line.split(",")[0]) for line in csv.read_text().splitlines()[1:]]


@pytest.mark.slow
def test_two_workers_train_in_step_and_resume_after_a_worker_is_killed(prepared, tiny_runs, tmp_path):
    """Two workers on 127.0.0.1: worker 1 is killed after the second epoch; the chief stops
    with a clear error (no hang); both restarted finish from the last epoch, no epoch lost
    or repeated, with identical weights, and the chief's RUN_DIR holds what a one-process run
    holds."""
    run = tmp_path / "run"
    epochs = 5
    procs = _start_workers(prepared, run, epochs, tmp_path, "first")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and (not (run / "history.csv").exists() or len(_epochs(run / "history.csv")) < 2):
        assert procs[0].poll() is None, (tmp_path / "first-worker0.log").read_text()[-3000:]
        time.sleep(0.1)
    assert len(_epochs(run / "history.csv")) >= 2
    os.killpg(procs[1].pid, signal.SIGKILL)
    code = _wait([procs[0]], 120)[0]
    log0 = (tmp_path / "first-worker0.log").read_text()
    done_before = _epochs(run / "history.csv")
    if code == 0:  # the chief finished the last epoch before it noticed: nothing to resume
        pytest.fail(f"the chief finished all {epochs} epochs before worker 1 was killed; raise epochs")
    assert code == 2, log0[-3000:]
    assert "a worker was lost during training" in log0 and "Restart every worker" in log0
    assert "Traceback" not in log0
    assert (run / "backup").exists()  # BackupAndRestore state kept for the restart

    procs = _start_workers(prepared, run, epochs, tmp_path, "second")
    assert _wait(procs, 300) == [0, 0], (tmp_path / "second-worker0.log").read_text()[-3000:]
    assert _epochs(run / "history.csv") == list(range(epochs))  # each epoch exactly once
    assert len(done_before) >= 2
    summary = json.loads((run / "history.json").read_text())["summary"]
    assert summary["resumed"] is True
    assert summary["epochs_run_in_this_fit"] == epochs - len(done_before)
    chief, worker = _weights(run / "last.keras"), _weights(run / "workers" / "worker-1" / "last.keras")
    assert all(np.array_equal(a, b) for a, b in zip(chief, worker))
    assert all(np.isfinite(w).all() for w in chief)
    assert json.loads((run / "config.json").read_text())["replicas"] == 2
    single = {p.name for p in tiny_runs["segmenter"].iterdir()}
    assert {p.name for p in run.iterdir()} - {"workers"} == single


@pytest.mark.slow
def test_a_worker_that_never_joins_is_a_bounded_clear_error(prepared, tmp_path):
    procs = _start_workers(prepared, tmp_path / "run", 1, tmp_path, "alone", start=0,
                           env_extra={"TF_BUS_JOIN_TIMEOUT": "5"})
    t0 = time.monotonic()
    code = _wait(procs, 90)[0]
    log = (tmp_path / "alone-worker0.log").read_text()
    assert time.monotonic() - t0 < 60
    assert code != 0
    assert "not every worker joined within 5s" in log and "same TF_CONFIG cluster" in log


def test_only_multiworker_runs_read_tf_config_for_the_run_dir(monkeypatch, tmp_path):
    from tf_bus.training.distribute import worker_run_dir

    monkeypatch.setenv("TF_CONFIG", "{not json: set for another tool")
    assert worker_run_dir(tmp_path, "default") == tmp_path  # never parsed, never an error
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                                                "task": {"type": "worker", "index": 1}}))
    assert worker_run_dir(tmp_path, "mirrored") == tmp_path
    assert worker_run_dir(tmp_path, "multiworker") == tmp_path / "workers" / "worker-1"


@pytest.mark.slow
def test_tuner_trials_and_the_two_phase_classifier_train_across_two_workers(prepared, tiny_runs, tmp_path):
    """`tf-bus tune --strategy multiworker --retrain`: both workers' seeded tuners run the same
    trial across the 2 processes, then the best configuration retrains through the head
    and fine-tuning phases; every worker ends with the chief's weights."""
    weights = tiny_runs["classifier"].parent / "backbone.weights.h5"  # a TEST_BACKBONE's
    tune, run = tmp_path / "tune", tmp_path / "run"
    command = ["tune", "--data", str(prepared), "--out", str(tune), "--retrain", str(run), "--weights", str(weights),
               "--image-size", "32,32", "--max-trials", "1", "--backbones", TEST_BACKBONE, "--batch-sizes", "8",
               "--epochs-range", "2,2", "--fine-tune-stages-range", "1,1", "--head-epochs", "1", "--strategy", "multiworker",
               "--quiet"]
    procs = _start_workers(prepared, run, 0, tmp_path, "tune", command=command)
    assert _wait(procs, 420) == [0, 0], (tmp_path / "tune-worker0.log").read_text()[-3000:]
    chief_best = json.loads((tune / "best_hyperparameters.json").read_text())
    worker_best = json.loads((tune / "workers" / "worker-1" / "best_hyperparameters.json").read_text())
    assert chief_best["strategy"] == "multiworker" and chief_best["replicas"] == 2
    assert chief_best["trials_completed"] == 1
    # The same trial, the same all-reduced score on both workers.
    assert (worker_best["values"], worker_best["score"]) == (chief_best["values"], chief_best["score"])
    worker_run = run / "workers" / "worker-1"
    for d in (run, worker_run):
        assert _epochs(d / "history.csv") == [0, 1]  # the head phase, then the fine-tuning phase
        assert (d / "head.weights.h5").is_file()
    summary = json.loads((run / "history.json").read_text())["summary"]
    assert summary["head_epochs"] == 1 and summary["epochs_run_in_this_fit"] == 2
    assert json.loads((run / "config.json").read_text())["replicas"] == 2
    chief, worker = _weights(run / "last.keras"), _weights(worker_run / "last.keras")
    assert all(np.array_equal(a, b) for a, b in zip(chief, worker))
    assert all(np.isfinite(w).all() for w in chief)
    single = {p.name for p in tiny_runs["classifier"].iterdir()}
    assert {p.name for p in run.iterdir()} - {"workers"} == single
