"""Choosing the compute precision: float32 or mixed_bfloat16."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import keras

from tf_bus.config import ConfigError


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True where the CPU has bf16 arithmetic (AVX512_BF16 or AMX-BF16).

    Without it TensorFlow emulates bf16 and mixed precision is several times *slower*.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def onednn_enabled() -> bool | None:
    """Whether this process's TensorFlow runs oneDNN's CPU kernels (decided when TensorFlow
    was imported, from ``TF_ENABLE_ONEDNN_OPTS`` and the CPU); None where it cannot tell."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def resolve_precision(name: str) -> str:
    """``auto`` -> ``mixed_bfloat16`` on a GPU or a CPU with native bf16, else ``float32``."""
    if name == "auto":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU") or cpu_has_native_bf16():
            return "mixed_bfloat16"
        return "float32"
    if name not in ("float32", "mixed_bfloat16"):
        raise ConfigError(f"`precision` must be auto, float32 or mixed_bfloat16. Received: precision={name!r}")
    return name


def set_precision(name: str) -> str:
    """Resolves and sets Keras' global dtype policy; returns the policy set."""
    policy = resolve_precision(name)
    keras.mixed_precision.set_global_policy(policy)
    return policy


@contextlib.contextmanager
def precision_policy(name: str) -> Iterator[str]:
    """``set_precision(name)`` while the block runs; yields the policy set. The process's
    policy before it is restored afterwards, also when the block raises (a training run that
    fails on bad data must not leave the caller's later models in bfloat16)."""
    before = keras.mixed_precision.global_policy()
    try:
        yield set_precision(name)
    finally:
        keras.mixed_precision.set_global_policy(before)
