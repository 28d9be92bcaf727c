"""Keras's AdamW against tf-bus's FusedAdam: the first training step (trace) and steady steps.

In one process, for each model (the classifier's ResNet50 from scratch, every layer
trainable, and the default U-Net, both at the CLI's default size and precision): build,
compile with Keras's ``AdamW`` or with ``FusedAdam`` (the same arithmetic, one
``ResourceApplyAdam`` kernel per variable; ``tf_bus.models.optimizers``), then time the
first ``fit`` of one batch (tracing the training step, TensorFlow's graph optimisation and
the first run: what every run and every test pays before its first step) and a ``fit`` of
``--steps`` more batches. The two optimizers alternate ``--rounds`` times, the first one
swapped each round, so that a drifting host affects both alike; medians and ratios are
printed as JSON.

    python benchmarks/optimizer.py [--models resnet50,unet] [--size 128] [--batch N] [--steps 5] [--rounds 3]
        [--precision auto]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from flops import batched_dataset  # noqa: E402  (benchmarks/flops.py)

MODELS = ("resnet50", "resnet101", "unet")
OPTIMIZERS = ("keras_adamw", "fused_adam")


def build(name: str, size: int):
    """(model, loss) of tf-bus's classifier (from scratch) or default U-Net at ``size``."""
    from tf_bus.config import SegmenterConfig
    from tf_bus.models.classifier import build_classifier, set_trainable_stages
    from tf_bus.models.losses import get_loss
    from tf_bus.models.unet import UNet

    if name == "unet":
        d = SegmenterConfig()
        return UNet((size, size), 1, depth=d.depth, base_filters=d.base_filters), get_loss(d.loss)
    model = build_classifier(name, None, (size, size), channels=1)
    set_trainable_stages(model, None)
    return model, "categorical_crossentropy"


def data(name: str, size: int, n: int):
    import keras

    rng = np.random.default_rng(0)
    if name == "unet":
        return rng.random((n, size, size, 1), np.float32), (rng.random((n, size, size, 1)) > 0.9).astype(np.float32)
    x = (rng.random((n, size, size, 1)) * 255).astype(np.float32)
    return x, keras.utils.to_categorical(rng.integers(0, 3, n), 3)


def time_one(name: str, optimizer: str, size: int, batch: int, steps: int, precision: str) -> dict:
    """Seconds of the first fit (one batch) and training images/s of the next ``steps`` batches."""
    import keras

    from tf_bus.models.optimizers import FusedAdam
    from tf_bus.training.common import build_before_fit

    keras.mixed_precision.set_global_policy(precision)
    try:
        keras.utils.set_random_seed(0)
        model, loss = build(name, size)
        opt = (keras.optimizers.AdamW(1e-3, weight_decay=1e-4) if optimizer == "keras_adamw"
               else FusedAdam(1e-3, weight_decay=1e-4))
        model.compile(optimizer=opt, loss=loss, jit_compile=False)
        build_before_fit(model)  # as the trainers do: the step is traced once
        x, y = data(name, size, batch * (steps + 1))
        first, rest = batched_dataset(x[:batch], y[:batch], batch), batched_dataset(x[batch:], y[batch:], batch)
        t = time.perf_counter()
        model.fit(first, epochs=1, verbose=0)
        first_s = time.perf_counter() - t
        t = time.perf_counter()
        model.fit(rest, epochs=1, verbose=0)
        rate = batch * steps / (time.perf_counter() - t)
        return {"first_step_s": round(first_s, 2), "train_images_per_s": round(rate, 2),
                "trainable_variables": len(model.trainable_variables)}
    finally:
        keras.mixed_precision.set_global_policy("float32")


def main() -> None:
    from tf_bus.config import PRECISIONS, ClassifierConfig, SegmenterConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,unet", help=f"comma list of {', '.join(MODELS)} (default: resnet50,unet)")
    ap.add_argument("--size", type=int, default=128, help="square input side in pixels (default: 128, the CLI's)")
    ap.add_argument("--batch", type=int, default=None,
                    help="batch size (default: each trainer's, 16 for the ResNets and 32 for the U-Net)")
    ap.add_argument("--steps", type=int, default=5, help="timed steady training steps after the first (default: 5)")
    ap.add_argument("--rounds", type=int, default=3, help="times each optimizer is timed, alternating (default: 3)")
    ap.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="Keras precision policy; auto: what `tf-bus --precision auto` picks here (default: auto)")
    args = ap.parse_args()
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"--models: {unknown[0]!r} is not one of {', '.join(MODELS)}")
    for flag in ("size", "batch", "steps", "rounds"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            ap.error(f"--{flag}: must be at least 1, got {getattr(args, flag)}")

    from tf_bus.tflog import import_tensorflow

    tf = import_tensorflow()  # without the start-up lines TF_CPP_MIN_LOG_LEVEL hides (README, "Installing")

    from tf_bus.training.precision import onednn_enabled, resolve_precision

    precision = resolve_precision(args.precision)
    batches = {m: args.batch or (SegmenterConfig().batch_size if m == "unet" else ClassifierConfig().batch_size)
               for m in models}
    out = {"benchmark": "optimizer", "size": args.size, "batch": batches, "steps": args.steps,
           "rounds": args.rounds, "precision": precision, "cpu_count": os.cpu_count(),
           "tensorflow": tf.__version__, "onednn_active": onednn_enabled(), "runs": {}, "median": {}, "ratios": {}}
    for name in models:
        runs: dict[str, list[dict]] = {o: [] for o in OPTIMIZERS}
        for r in range(args.rounds):
            for optimizer in (OPTIMIZERS if r % 2 == 0 else OPTIMIZERS[::-1]):
                runs[optimizer].append(time_one(name, optimizer, args.size, batches[name], args.steps, precision))
        median = {o: {k: round(statistics.median(run[k] for run in runs[o]), 3) for k in ("first_step_s", "train_images_per_s")}
                  for o in OPTIMIZERS}
        out["runs"][name], out["median"][name] = runs, median
        out["ratios"][name] = {
            "first_step_keras_over_fused": round(median["keras_adamw"]["first_step_s"]
                                                 / median["fused_adam"]["first_step_s"], 3),
            "steady_speedup_fused_over_keras": round(median["fused_adam"]["train_images_per_s"]
                                                     / median["keras_adamw"]["train_images_per_s"], 3)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
