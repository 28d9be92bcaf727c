"""What the training benchmarks share: analytic convolution FLOPs, the matmul peak, and the
in-memory feed of the timed epochs."""

from __future__ import annotations

import time


def batched_dataset(x, y, batch: int):
    """NumPy (x, y) as whole batches through tf.data, as the trainers' loaders feed ``fit``:
    autotuning off (``LoaderConfig.autotune``). Keras' own feed of NumPy arrays autotunes,
    and ending its iterator after an epoch blocked for seconds on a 2-core CPU (README,
    "tf.data autotuning")."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    batched = (x.reshape(-1, batch, *x.shape[1:]), y.reshape(-1, batch, *y.shape[1:]))
    return tf.data.Dataset.from_tensor_slices(batched).prefetch(2).with_options(options)


def conv_flops(model) -> float:
    """Forward FLOPs of one image through the model's (transposed) convolutions, nested
    models (a ResNet backbone) included; multiply-add = 2 FLOPs."""
    import keras

    total = 0.0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += conv_flops(layer)
        elif isinstance(layer, keras.layers.Conv2DTranspose):
            _, h, w, cin = layer.input.shape
            kh, kw = layer.kernel_size
            total += 2.0 * h * w * kh * kw * cin * layer.filters
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, cout = layer.output.shape
            cin = layer.input.shape[-1]
            kh, kw = layer.kernel_size
            total += 2.0 * h * w * kh * kw * cin * cout
    return total


def compute_dtype(precision: str) -> str:
    """The dtype a Keras precision policy multiplies in: ``mixed_bfloat16`` -> ``bfloat16``,
    ``mixed_float16`` -> ``float16``, ``float32`` -> ``float32``."""
    return precision.removeprefix("mixed_")


def matmul_peak(dtype: str, n: int = 2048, repeats: int = 5) -> float:
    """The best FLOP/s of ``repeats`` (n x n) @ (n x n) matmuls in float32, bfloat16 or float16."""
    import tensorflow as tf

    a = tf.random.uniform((n, n), dtype=tf.float32)
    b = tf.random.uniform((n, n), dtype=tf.float32)
    if dtype != "float32":
        a, b = tf.cast(a, dtype), tf.cast(b, dtype)
    f = tf.function(lambda x, y: tf.matmul(x, y))
    f(a, b).numpy()
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).numpy()
        best = max(best, 2.0 * n ** 3 / (time.perf_counter() - t))
    return best


def significant(x: float, digits: int = 3) -> float:
    """``x`` rounded to ``digits`` significant digits: a tiny model's utilisation stays above 0."""
    return float(f"{x:.{digits}g}")
