"""U-Net training throughput and FLOP utilisation, against this machine's matmul peak.

In one process: (1) the peak, as the best of several large ``tf.matmul`` runs in float32
(and bfloat16 where asked); (2) ``model.fit`` steps of the default U-Net (or the given
size) on in-memory data, per precision. Model FLOPs are counted analytically from the
convolution layers (multiply-add = 2 FLOPs; a training step = 3x the forward pass).
Prints JSON. oneDNN's kernels are on, as under ``tf-bus``; ``--onednn both`` times them
against TensorFlow's Eigen kernels in alternating child processes (``benchmarks/onednn.py``).
``--batch-norm both`` times the U-Net's fused batch norm (the default) against Keras' own
``BatchNormalization`` in the same process, and ``--batch 8,16,32`` several batch sizes;
``--deep-supervision 0,3`` times training without and with auxiliary outputs on decoder levels
1..3 (``tf_bus.models.unet.DeepSupervision``); the variants alternate ``--bn-rounds`` times, medians.

    python benchmarks/segmenter_training.py [--size 128] [--base-filters 16] [--precisions auto]
        [--batch 8[,16,...]] [--batch-norm fused|keras|both] [--deep-supervision 0[,3,...]] [--bn-rounds 3]
        [--onednn on|off|both] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import onednn  # noqa: E402  (benchmarks/onednn.py)
from flops import batched_dataset, compute_dtype, conv_flops, matmul_peak, significant  # noqa: E402  (benchmarks/flops.py)


def build(size: int, base: int, depth: int, batch: int, precision: str, fused: bool, deep_supervision: int = 0):
    """A compiled default U-Net under ``precision`` (wrapped in ``DeepSupervision`` with that many
    levels), its step traced; FLOPs of one image (auxiliary heads included)."""
    import keras

    from tf_bus.models.losses import get_loss
    from tf_bus.models.optimizers import FusedAdam  # what the trainers use
    from tf_bus.models.unet import DeepSupervision, UNet
    from tf_bus.training.common import build_before_fit

    keras.mixed_precision.set_global_policy(precision)
    model = UNet((size, size), 1, depth=depth, base_filters=base, fused_batch_norm=fused)
    counted = model
    if deep_supervision:
        model = DeepSupervision(model, deep_supervision)
        counted = model.supervised  # the U-Net's layers and the heads, once each
    model.compile(optimizer=FusedAdam(1e-3, weight_decay=1e-4), loss=get_loss("bce_dice"), jit_compile=False)
    build_before_fit(model)  # one trace of the step, as the trainers do
    model.fit(batched_dataset(*data(size, batch * 2), batch), epochs=1, verbose=0)  # trace, as timed
    keras.mixed_precision.set_global_policy("float32")
    return model, conv_flops(counted)


def data(size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.random((n, size, size, 1), np.float32),
            (rng.random((n, size, size, 1)) > 0.9).astype(np.float32))


def train_rate(model, ds, n: int) -> float:
    """Training images/s of one epoch over ``ds`` (``n`` images)."""
    t = time.perf_counter()
    model.fit(ds, epochs=1, verbose=0)
    return n / (time.perf_counter() - t)


def main() -> None:
    from tf_bus.cli import _int_list
    from tf_bus.config import PRECISIONS, SegmenterConfig

    d = SegmenterConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=d.image_size[0], help="square input side (default: the CLI's)")
    ap.add_argument("--base-filters", type=int, default=d.base_filters, help="U-Net base filters (default: the CLI's)")
    ap.add_argument("--depth", type=int, default=d.depth, help="U-Net depth (default: the CLI's)")
    ap.add_argument("--batch", type=_int_list, default=(d.batch_size,),
                    help="batch size, or a comma list of them timed side by side (default: the CLI's)")
    ap.add_argument("--steps", type=int, default=6, help="timed training steps (default: 6)")
    ap.add_argument("--precisions", default="auto",
                    help="comma list of float32, mixed_bfloat16, mixed_float16 and auto (what the CLI's "
                         "`--precision auto` picks here: see `tf-bus train-segmenter --help`) "
                         "(default: auto, the precision a default run trains in)")
    ap.add_argument("--batch-norm", choices=("fused", "keras", "both"), default="fused",
                    help="fused: the U-Net's default batch norm (TensorFlow's fused kernel); keras: "
                         "keras.layers.BatchNormalization; both: time the two, alternating (default: fused)")
    ap.add_argument("--deep-supervision", type=_int_list, default=(d.deep_supervision,), metavar="N[,N...]",
                    help="auxiliary decoder outputs trained alongside (the CLI's --deep-supervision); a comma "
                         "list, e.g. 0,3, is timed side by side (default: the CLI's)")
    ap.add_argument("--bn-rounds", type=int, default=3,
                    help="with --batch-norm both, several --batch sizes or several --deep-supervision levels: "
                         "alternating timed epochs per variant, medians (default: 3)")
    onednn.add_arguments(ap)
    args = ap.parse_args()
    batches = list(args.batch)
    if any(b < 1 for b in batches):
        ap.error(f"--batch: sizes must be positive, got {','.join(map(str, batches))!r}")
    levels = list(args.deep_supervision)
    if any(not 0 <= n < args.depth for n in levels):
        ap.error(f"--deep-supervision: levels must be within 0..depth-1 = 0..{args.depth - 1}, "
                 f"got {','.join(map(str, levels))!r}")
    names = [n.strip() for n in args.precisions.split(",")]
    for name in names:
        if name not in PRECISIONS:  # the CLI's own list; auto is resolved once TensorFlow is imported
            ap.error(f"--precisions: {name!r} is not one of {', '.join(PRECISIONS)}")
    if onednn.compared(args, __file__, "segmenter_training"):
        return

    from tf_bus.tflog import import_tensorflow

    tf = import_tensorflow()  # without the start-up lines TF_CPP_MIN_LOG_LEVEL hides (README, "Installing")

    from tf_bus.training.precision import cpu_has_native_bf16, onednn_enabled, resolve_precision

    precisions = list(dict.fromkeys(resolve_precision(n) for n in names))  # auto as the CLI resolves it

    out = {"benchmark": "segmenter_training", "size": args.size, "base_filters": args.base_filters,
           "depth": args.depth, "batch": batches[0] if len(batches) == 1 else batches,
           "batch_norm": args.batch_norm, "deep_supervision": levels[0] if len(levels) == 1 else levels,
           "cpu_count": os.cpu_count(),
           "tensorflow": tf.__version__, "native_bf16": cpu_has_native_bf16(),
           "onednn_active": onednn_enabled(), "results": {}}
    bn_variants = ("keras", "fused") if args.batch_norm == "both" else (args.batch_norm,)
    variants = [(v, b, n) for v in bn_variants for b in batches for n in levels]
    rounds = args.bn_rounds if len(variants) > 1 else 1
    for precision in precisions:
        peak = matmul_peak(compute_dtype(precision))
        models = {(v, b, n): build(args.size, args.base_filters, args.depth, b, precision, v == "fused", n)
                  for v, b, n in variants}
        data_by_batch = {b: batched_dataset(*data(args.size, b * args.steps), b) for b in batches}
        rates: dict[tuple[str, int, int], list[float]] = {v: [] for v in variants}
        for _ in range(rounds):
            for v, b, n in variants:
                rates[v, b, n].append(train_rate(models[v, b, n][0], data_by_batch[b], b * args.steps))
        result = {}
        for v, b, n in variants:
            rate, flops = float(np.median(rates[v, b, n])), models[v, b, n][1]
            achieved = rate * 3.0 * flops
            result[v, b, n] = {
                "train_images_per_s": round(rate, 2),
                "forward_gflops_per_image": round(flops / 1e9, 4),
                "achieved_gflop_per_s": significant(achieved / 1e9, 4),
                "matmul_peak_gflop_per_s": round(peak / 1e9, 1),
                "utilisation_of_peak": significant(achieved / peak),
            }
            if rounds > 1:
                result[v, b, n]["rates"] = [round(r, 2) for r in rates[v, b, n]]

        def by_level(v: str, b: int) -> dict:
            if len(levels) == 1:
                return result[v, b, levels[0]]
            base = result[v, b, levels[0]]["train_images_per_s"]  # ratios against the first level listed
            return {**{f"deep_supervision_{n}": result[v, b, n] for n in levels},
                    f"speed_over_deep_supervision_{levels[0]}": {
                        f"deep_supervision_{n}": round(result[v, b, n]["train_images_per_s"] / base, 3)
                        for n in levels[1:]}}

        def by_batch(v: str) -> dict:
            return by_level(v, batches[0]) if len(batches) == 1 else {f"batch_{b}": by_level(v, b) for b in batches}

        if len(bn_variants) == 1:
            out["results"][precision] = by_batch(bn_variants[0])
        else:
            out["results"][precision] = {
                **{f"{v}_batch_norm": by_batch(v) for v in bn_variants},
                "fused_batch_norm_speedup": round(
                    float(np.median([result["fused", b, n]["train_images_per_s"]
                                     / result["keras", b, n]["train_images_per_s"] for b in batches for n in levels])), 3),
            }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
