"""U-Net training with ``--deterministic`` against without, through the real loader.

``train-segmenter --deterministic`` (``SegmenterConfig.deterministic``) keeps tf.data's
element order under parallel decoding and runs TensorFlow's deterministic kernels
(``tf.config.experimental.enable_op_determinism``), so one seed gives one model. This times
what that costs: the default U-Net (or the given size) trained by ``model.fit`` on the train
split of DATA through ``segmentation_dataset`` with augmentation, as ``train-segmenter``
feeds it. Op determinism is a process-wide switch, so each setting runs in its own child
process, the two alternating ``--rounds`` times (a host whose speed drifts slows both
alike); each child traces and warms up with one epoch, then times ``--epochs``. Prints JSON:
every child's images/s and epoch seconds, what TensorFlow reported as set in it, the
medians, and the slow-down of deterministic training.

    python benchmarks/determinism.py DATA [--epochs 5] [--rounds 2] [--size 128]
        [--depth 5] [--base-filters 16] [--batch 32] [--precision auto]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_loader import (add_model_arguments, check_counts, compiled_segmenter,  # noqa: E402  (benchmarks/)
                         per_setting, segmenter_config, timed_fit, train_dataset)

SETTINGS = ("off", "on")


def child(args) -> dict:
    """One setting, timed in this process."""
    import keras
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    from tf_bus.training.precision import set_precision

    deterministic = args.setting == "on"
    if deterministic:
        tf.config.experimental.enable_op_determinism()  # as train-segmenter does for the run
    config = segmenter_config(args, deterministic=deterministic)
    policy = set_precision(config.precision)
    ds, n = train_dataset(args.data, config)  # the config's loader order (loader_config)
    model = compiled_segmenter(config, int(ds.cardinality()))
    model.fit(ds, epochs=1, verbose=0)  # trace the step, fill the loader's cache
    fit = timed_fit(model, ds, n, args.epochs)
    keras.mixed_precision.set_global_policy("float32")
    return {**fit, "op_determinism": tf_config.is_op_determinism_enabled(),
            "loader_deterministic": bool(ds.options().deterministic), "train_images": n, "precision": policy,
            "tensorflow": tf.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(ap)
    ap.add_argument("--setting", choices=SETTINGS, default=None,
                    help="time one setting in this process (what each child process runs); default: both, "
                         "in alternating child processes")
    args = ap.parse_args()
    check_counts(ap, args)
    if args.setting:
        from tf_bus.tflog import import_tensorflow

        import_tensorflow()  # without the start-up lines TF_CPP_MIN_LOG_LEVEL hides (README, "Installing")
        print(json.dumps(child(args)))
        return
    fits: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for _ in range(args.rounds):
        for setting in SETTINGS:
            r = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--setting", setting],
                               capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"determinism.py --setting {setting} failed:\n{r.stderr[-3000:]}")
            fits[setting].append(json.loads(r.stdout.strip().splitlines()[-1]))
    median, results = per_setting(fits)
    first = fits["off"][0]
    out = {
        "benchmark": "determinism", "train_images": first["train_images"], "batch": args.batch,
        "epochs_per_fit": args.epochs, "rounds": args.rounds, "precision": first["precision"],
        "cpu_count": os.cpu_count(), "tensorflow": first["tensorflow"],
        "results": results, "deterministic_slowdown": round(median["off"] / median["on"], 3),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
