"""Shared fixtures: seeded RNGs, synthetic data made once per session, the real BUSI copy."""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import tf_bus  # noqa: F401  first, before TensorFlow: it turns oneDNN on, as under `tf-bus`

REPO = Path(__file__).resolve().parents[1]
REAL_BUSI = Path(os.environ.get("TF_BUS_REAL_DATA", REPO.parent / "shared" / "busi")) / "Dataset_BUSI_with_GT"


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    try:
        import keras

        keras.utils.set_random_seed(0)
    except ImportError:  # pragma: no cover - keras is a dependency
        pass


def cli(*args) -> subprocess.CompletedProcess:
    """``tf-bus ARGS`` run in this process (``tf_bus.cli.main``), with its stdout and stderr
    captured, as ``subprocess.run`` would return them. A ``tf-bus`` process would spend about
    5 s importing TensorFlow before it starts; what ``main`` does as a process (exit codes,
    one-line errors, TensorFlow's log lines) is tested in test_cli.py and test_tflog.py. An
    exception that escapes ``main`` fails the test with its traceback."""
    import contextlib
    import io

    from tf_bus.cli import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's refusals and --help
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    return subprocess.CompletedProcess(["tf-bus", *argv], code, out.getvalue(), err.getvalue())


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder that ``build(folder)`` fills, built once per test session and shared by the
    pytest-xdist workers (each worker would otherwise build its own copy of a module
    fixture: two 2-fold cross-validations cost minutes). The first worker to get the lock
    builds; the others wait, then read the same folder. Read-only by convention, like the
    fixtures it serves. Without xdist it is a plain ``mktemp`` folder."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    folder = tmp_path_factory.getbasetemp().parent / f"shared-{name}"  # the session's, above each worker's
    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if build raises
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed in another worker
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def synthetic_release(tmp_path_factory) -> Path:
    """A 36-case synthetic release (read-only by convention: copy before breaking it)."""
    from tf_bus.data.busi import RELEASE_DIRNAME
    from tf_bus.data.synthetic import make_synthetic

    # Built once for every xdist worker, like the runs made from it (`two_cvs`, `tiny_runs`):
    # those record the data path they trained on, and a worker that resumed one with its own
    # copy's path would be refused as "other settings".
    root = built_once(tmp_path_factory, "synth", lambda folder: make_synthetic(folder / "busi", n=36, seed=3))
    return root / "busi" / RELEASE_DIRNAME


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, synthetic_release) -> Path:
    from tf_bus.data.layouts import prepare

    return built_once(tmp_path_factory, "prepared", lambda folder: prepare(synthetic_release, folder / "out")) / "out"


@pytest.fixture(scope="session")
def real_busi() -> Path:
    """The real BUSI copy beside the checkout. Missing data fails loudly, never skips."""
    if not REAL_BUSI.is_dir():
        pytest.fail(f"real BUSI data not found at {REAL_BUSI}; set TF_BUS_REAL_DATA to the folder holding Dataset_BUSI_with_GT")
    return REAL_BUSI


@pytest.fixture(scope="session")
def real_prepared(tmp_path_factory, real_busi) -> Path:
    from tf_bus.data.layouts import prepare

    return built_once(tmp_path_factory, "real", lambda folder: prepare(real_busi, folder / "out")) / "out"


def tree_digest(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under root: proves a folder was not modified."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


#: The classifier backbone of the tests that train one where the backbone is not the point: a
#: resnet14 traces and first runs in under half a ResNet50's time (ResNet50 and ResNet101
#: themselves: test_classifier_model, test_train_classifier, the demo and the notebook).
TEST_BACKBONE = "resnet14"


def backbone_weights(path: Path, backbone: str = TEST_BACKBONE, size: int = 32) -> Path:
    """A local backbone weights file (``--weights PATH``) of freshly initialised ``backbone``."""
    from tf_bus.config import BACKBONE_BLOCKS
    from tf_bus.models.classifier import bottleneck_resnet

    bottleneck_resnet(BACKBONE_BLOCKS[backbone], (size, size, 3)).save_weights(path)
    return path


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, prepared) -> dict[str, Path]:
    """A tiny trained segmenter and classifier run (32 px, one epoch), for export and serving.
    The classifier is a resnet14 (``TEST_BACKBONE``) fine-tuning its head over a local backbone
    weights file, ``backbone.weights.h5`` beside the runs (quick to trace). Built once for every
    xdist worker; read-only by convention."""

    def build(root):
        from tf_bus.config import ClassifierConfig, SegmenterConfig
        from tf_bus.training.classification import train_classifier
        from tf_bus.training.segmentation import train_segmenter

        seg = SegmenterConfig(image_size=(32, 32), depth=2, base_filters=4, epochs=1, batch_size=8, warmup_epochs=0,
                              time_budget_minutes=0)
        train_segmenter(prepared, root / "seg", seg, verbose=0)
        weights = backbone_weights(root / "backbone.weights.h5")
        cls = ClassifierConfig(backbone=TEST_BACKBONE, image_size=(32, 32), weights=str(weights), head_epochs=1,
                               epochs=1, batch_size=8, warmup_epochs=0, time_budget_minutes=0)
        train_classifier(prepared, root / "cls", cls, verbose=0)

    root = built_once(tmp_path_factory, "runs", build)
    return {"segmenter": root / "seg", "classifier": root / "cls"}


#: The 2-fold U-Net cross-validation of ``two_cvs`` (`tf-bus train-segmenter` flags).
CV_SEGMENTER_FLAGS = ["--image-size", "32", "--depth", "2", "--base-filters", "4", "--batch-size", "8", "--epochs", "2",
                      "--warmup-epochs", "0", "--no-diagnostics", "--quiet"]


@pytest.fixture(scope="session")
def two_cvs(synthetic_release, tmp_path_factory) -> tuple[Path, Path]:
    """A 2-fold U-Net and a 2-fold ResNet cross-validation of the synthetic release (same
    folds): the U-Net's through the CLI (``CV_SEGMENTER_FLAGS``), the ResNet's through
    ``cross_validate``. Built once for every xdist worker and test module; read-only (tests
    that resume or overwrite one copy it first)."""
    from tf_bus.config import ClassifierConfig
    from tf_bus.training.cross_validation import cross_validate

    def build(root):
        r = cli("train-segmenter", "--data", synthetic_release, "--out", root / "seg", "--folds", "2",
                *CV_SEGMENTER_FLAGS)
        assert r.returncode == 0, r.stderr[-3000:]
        config = ClassifierConfig(backbone=TEST_BACKBONE, image_size=(32, 32), batch_size=8, epochs=1,
                                  warmup_epochs=0, time_budget_minutes=0, diagnostics=False)
        cross_validate("classifier", synthetic_release, root / "clf", config, folds=2, tta=False, verbose=0)

    root = built_once(tmp_path_factory, "cvs", build)
    return root / "seg", root / "clf"
