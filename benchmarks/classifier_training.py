"""ResNet50/101 classifier training throughput and FLOP utilisation, float32 against mixed precision.

In one process, for every backbone and precision: the matmul peak of that precision
(the best of several large ``tf.matmul`` runs), then ``model.fit`` steps of the
classifier from scratch (every layer trains, as with ``--weights none``) on in-memory
images. Model FLOPs are counted analytically from the convolutions (multiply-add = 2
FLOPs; a training step = 3x the forward pass). Prints JSON.

Where the CPU has no native bf16 (no AVX512_BF16/AMX: ``native_bf16`` false in the
output), TensorFlow emulates bfloat16 and ``mixed_bfloat16`` is expected to be slower;
that is what ``--precision auto`` avoids. oneDNN's kernels are on, as under ``tf-bus``;
``--onednn both`` times them against TensorFlow's Eigen kernels in alternating child
processes (``benchmarks/onednn.py``).

``--batch-norm both`` times the fused batch norm (the default) against keras.applications'
own ``BatchNormalization``, one after the other in the same process.

    python benchmarks/classifier_training.py [--size 224] [--backbones resnet50,resnet101]
        [--precisions float32,mixed_bfloat16[,mixed_float16]] [--batch 8] [--steps 3] [--batch-norm fused|keras|both]
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


def train_rate(backbone: str, size: int, batch: int, steps: int, precision: str,
               fused: bool = True) -> tuple[float, float, int]:
    """(training images/s, forward FLOPs per image, parameters) of one backbone at one precision,
    with the fused batch norm (the default) or keras.applications' own."""
    import keras

    from tf_bus.models.classifier import build_classifier, set_trainable_stages
    from tf_bus.models.optimizers import FusedAdam  # what the trainers use
    from tf_bus.training.common import build_before_fit

    keras.mixed_precision.set_global_policy(precision)
    try:
        model = build_classifier(backbone, None, (size, size), channels=1, fused_batch_norm=fused)
        set_trainable_stages(model, None)
        model.compile(optimizer=FusedAdam(1e-3, weight_decay=1e-4), loss="categorical_crossentropy", jit_compile=False)
        build_before_fit(model)  # one trace of the step, as the trainers do
        rng = np.random.default_rng(0)
        x = (rng.random((batch * steps, size, size, 1)) * 255).astype(np.float32)
        y = keras.utils.to_categorical(rng.integers(0, 3, batch * steps), 3)
        ds = batched_dataset(x, y, batch)
        model.fit(ds.take(1), epochs=1, verbose=0)  # trace, with the timed input's spec
        t = time.perf_counter()
        model.fit(ds, epochs=1, verbose=0)
        rate = batch * steps / (time.perf_counter() - t)
        return rate, conv_flops(model), model.count_params()
    finally:
        keras.mixed_precision.set_global_policy("float32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224, help="square input side in pixels (default: 224)")
    ap.add_argument("--backbones", default="resnet50,resnet101",
                    help="comma list of resnet50, resnet101, resnet14 and resnet26 (default: resnet50,resnet101)")
    ap.add_argument("--precisions", default="float32,mixed_bfloat16",
                    help="comma list of float32, mixed_bfloat16 and mixed_float16 (default: float32,mixed_bfloat16)")
    ap.add_argument("--batch", type=int, default=8, help="batch size (default: 8)")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per backbone and precision (default: 3)")
    ap.add_argument("--batch-norm", choices=("fused", "keras", "both"), default="fused",
                    help="fused: the classifier's default batch norm (TensorFlow's fused kernel); keras: "
                         "keras.applications' BatchNormalization; both: time each (default: fused)")
    onednn.add_arguments(ap)
    args = ap.parse_args()
    from tf_bus.config import PRECISIONS  # not tf_bus.training: TensorFlow must wait for the --onednn setting

    policies = [p for p in PRECISIONS if p != "auto"]
    unknown = [n for n in args.precisions.split(",") if n not in policies]
    if unknown:
        ap.error(f"--precisions: {unknown[0]!r} is not one of {', '.join(policies)}")
    if onednn.compared(args, __file__, "classifier_training"):
        return

    from tf_bus.tflog import import_tensorflow

    tf = import_tensorflow()  # without the start-up lines TF_CPP_MIN_LOG_LEVEL hides (README, "Installing")

    from tf_bus.training.precision import cpu_has_native_bf16, onednn_enabled

    out = {"benchmark": "classifier_training", "size": args.size, "batch": args.batch, "steps": args.steps,
           "cpu_count": os.cpu_count(), "tensorflow": tf.__version__, "native_bf16": cpu_has_native_bf16(),
           "onednn_active": onednn_enabled(), "batch_norm": args.batch_norm,
           "matmul_peak_gflop_per_s": {}, "results": {}}
    variants = ("keras", "fused") if args.batch_norm == "both" else (args.batch_norm,)
    for precision in args.precisions.split(","):
        peak = matmul_peak(compute_dtype(precision))
        out["matmul_peak_gflop_per_s"][precision] = round(peak / 1e9, 1)
        for backbone in args.backbones.split(","):
            for variant in variants:
                rate, flops, params = train_rate(backbone, args.size, args.batch, args.steps, precision,
                                                 fused=variant == "fused")
                achieved = rate * 3.0 * flops
                result = {
                    "train_images_per_s": round(rate, 3),
                    "forward_gflops_per_image": round(flops / 1e9, 3),
                    "parameters": params,
                    "achieved_gflop_per_s": significant(achieved / 1e9, 4),
                    "utilisation_of_peak": significant(achieved / peak),
                }
                res = out["results"].setdefault(backbone, {})
                if len(variants) == 1:
                    res[precision] = result
                else:
                    res.setdefault(precision, {})[f"{variant}_batch_norm"] = result
            if len(variants) > 1:
                r = out["results"][backbone][precision]
                r["fused_batch_norm_speedup"] = round(r["fused_batch_norm"]["train_images_per_s"]
                                                      / r["keras_batch_norm"]["train_images_per_s"], 3)
    for backbone, res in out["results"].items():
        if "float32" in res and "mixed_bfloat16" in res and len(variants) == 1:
            res["bf16_speedup"] = round(res["mixed_bfloat16"]["train_images_per_s"] / res["float32"]["train_images_per_s"], 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
