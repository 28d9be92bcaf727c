"""Shared fixtures: seeded RNGs, synthetic data made once per session, the real BUSI copy."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

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


@pytest.fixture(scope="session")
def synthetic_release(tmp_path_factory) -> Path:
    """A 36-case synthetic release (read-only by convention: copy before breaking it)."""
    from tf_bus.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synth") / "busi", n=36, seed=3)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, synthetic_release) -> Path:
    from tf_bus.data.layouts import prepare

    out = tmp_path_factory.mktemp("prepared") / "out"
    prepare(synthetic_release, out)
    return out


@pytest.fixture(scope="session")
def real_busi() -> Path:
    """The real BUSI copy beside the checkout. Missing data fails loudly, never skips."""
    if not REAL_BUSI.is_dir():
        pytest.fail(f"real BUSI data not found at {REAL_BUSI}; set TF_BUS_REAL_DATA to the folder holding Dataset_BUSI_with_GT")
    return REAL_BUSI


@pytest.fixture(scope="session")
def real_prepared(tmp_path_factory, real_busi) -> Path:
    from tf_bus.data.layouts import prepare

    out = tmp_path_factory.mktemp("real") / "out"
    prepare(real_busi, out)
    return out


def tree_digest(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under root: proves a folder was not modified."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}
