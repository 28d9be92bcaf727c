"""Choosing the compute precision: float32, mixed_bfloat16 or mixed_float16.

``auto`` picks, for the hardware at hand, the fastest precision that trains as well as
float32: on a GPU, bf16 where its tensor cores do bf16 (compute capability 8.0 and up:
A100, H100, RTX 30xx/40xx), float16 with loss scaling where they do float16 only (7.x:
V100, T4, RTX 20xx), float32 on older or unidentified GPUs; on a CPU, bf16 where it has
bf16 arithmetic, else float32. Under ``mixed_float16`` Keras wraps the optimizer in a
``LossScaleOptimizer`` when the model is compiled, so that small gradients do not vanish
in float16."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import keras

from tf_bus.config import PRECISIONS, ConfigError


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


POLICIES = tuple(p for p in PRECISIONS if p != "auto")  # Keras dtype policies


def gpu_compute_capabilities() -> list[tuple[int, int] | None]:
    """The CUDA compute capability of every visible GPU, None where TensorFlow does not
    report one (e.g. a ROCm build); an empty list without GPUs."""
    import tensorflow as tf

    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            cc = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        except (RuntimeError, ValueError):
            cc = None
        capabilities.append(tuple(int(v) for v in cc) if cc else None)
    return capabilities


def auto_precision(gpu_capabilities: list[tuple[int, int] | None], cpu_bf16: bool) -> str:
    """What ``auto`` means on a machine with these GPUs (their compute capabilities, as
    ``gpu_compute_capabilities`` gives them) and this CPU; with several GPUs the oldest
    decides, since every replica runs the same precision."""
    if gpu_capabilities:
        if any(cc is None for cc in gpu_capabilities):
            return "float32"
        oldest = min(gpu_capabilities)
        if oldest >= (8, 0):
            return "mixed_bfloat16"
        return "mixed_float16" if oldest >= (7, 0) else "float32"
    return "mixed_bfloat16" if cpu_bf16 else "float32"


def emulated_precision_warning(name: str, gpu_capabilities: list[tuple[int, int] | None], cpu_bf16: bool) -> str | None:
    """The warning for a precision asked for by name that this machine would emulate:
    ``mixed_bfloat16`` with no GPU and no native bf16 on the CPU. None otherwise."""
    if name != "mixed_bfloat16" or gpu_capabilities or cpu_bf16:
        return None
    return ("precision=mixed_bfloat16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16 in /proc/cpuinfo): "
            "TensorFlow emulates it, and the default U-Net trained 13.8x slower than in float32 on such a CPU. "
            "Pass --precision auto (float32 here) unless you mean to check bf16 numerics.")


def resolve_precision(name: str) -> str:
    """``auto`` -> ``auto_precision`` for this machine; the other names are checked and
    returned (with a warning for one this machine would emulate)."""
    if name == "auto":
        return auto_precision(gpu_compute_capabilities(), cpu_has_native_bf16())
    if name not in POLICIES:
        raise ConfigError(f"`precision` must be auto, {', '.join(POLICIES)}. Received: precision={name!r}")
    if name == "mixed_bfloat16" and (message := emulated_precision_warning(name, gpu_compute_capabilities(),
                                                                           cpu_has_native_bf16())):
        warnings.warn(message, RuntimeWarning, stacklevel=2)
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
