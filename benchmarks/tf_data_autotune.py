"""U-Net training through the real loader, tf.data autotuning off (the default) against on.

The trainers' loaders (``tf_bus.data.pipeline``) switch tf.data's autotuning off
(``LoaderConfig.autotune``). This times why: the default U-Net (or the given size), trained
by ``model.fit`` for ``--epochs`` epochs on the train split of DATA (a ``tf-bus prepare``
output, the segmentation layout or a raw release) through ``segmentation_dataset``, with
augmentation, as ``train-segmenter`` feeds it. Keras makes a new iterator every epoch;
the two settings alternate ``--rounds`` times in one process. Prints JSON: images/s of
every fit, every epoch's seconds, the medians, and the speed-up of off over on.

    python benchmarks/tf_data_autotune.py DATA [--epochs 5] [--rounds 2] [--size 128]
        [--depth 5] [--base-filters 16] [--batch 32] [--precision auto]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    from tf_bus.config import PRECISIONS, SegmenterConfig

    d = SegmenterConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="a tf-bus prepare output, the segmentation layout, or a raw BUSI release")
    ap.add_argument("--epochs", type=int, default=5, help="epochs per fit (default: 5)")
    ap.add_argument("--rounds", type=int, default=2, help="fits per setting, alternating off and on (default: 2)")
    ap.add_argument("--size", type=int, default=d.image_size[0], help="square input side (default: the CLI's)")
    ap.add_argument("--depth", type=int, default=d.depth, help="U-Net depth (default: the CLI's)")
    ap.add_argument("--base-filters", type=int, default=d.base_filters, help="U-Net base filters (default: the CLI's)")
    ap.add_argument("--batch", type=int, default=d.batch_size, help="batch size (default: the CLI's)")
    ap.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                    help="float32, mixed_bfloat16 or auto, as train-segmenter (default: the CLI's)")
    args = ap.parse_args()
    for flag in ("epochs", "rounds", "batch"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")

    import keras
    import tensorflow as tf

    from tf_bus.data.pipeline import count_segmentation_examples, segmentation_dataset
    from tf_bus.models.losses import get_loss
    from tf_bus.training.common import build_before_fit, make_optimizer
    from tf_bus.training.precision import set_precision
    from tf_bus.training.segmentation import build_segmenter, loader_config

    config = SegmenterConfig(image_size=(args.size, args.size), depth=args.depth, base_filters=args.base_filters,
                             batch_size=args.batch, precision=args.precision)
    policy = set_precision(config.precision)
    n = count_segmentation_examples(args.data, "train", lesion_only=config.lesion_only)
    datasets = {setting: segmentation_dataset(args.data, "train",
                                              loader_config(config, augment=True, lesion_only=config.lesion_only,
                                                            autotune=setting == "on"), training=True)
                for setting in ("off", "on")}
    steps = int(datasets["off"].cardinality())
    model = build_segmenter(config)
    model.compile(optimizer=make_optimizer(config.learning_rate, "constant", 0, 1, steps, config.weight_decay),
                  loss=get_loss(config.loss), jit_compile=False)
    build_before_fit(model)
    model.fit(datasets["off"], epochs=1, verbose=0)  # trace the step, fill the loaders' caches
    model.fit(datasets["on"], epochs=1, verbose=0)

    class EpochTimes(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(round(time.perf_counter() - self.t0, 3))

    fits: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for setting in ("off", "on"):
            timer = EpochTimes()
            t = time.perf_counter()
            model.fit(datasets[setting], epochs=args.epochs, verbose=0, callbacks=[timer])
            wall = time.perf_counter() - t
            fits[setting].append({"train_images_per_s": round(n * args.epochs / wall, 2),
                                  "epoch_seconds": timer.seconds})
    keras.mixed_precision.set_global_policy("float32")
    median = {s: statistics.median(f["train_images_per_s"] for f in fits[s]) for s in fits}
    out = {
        "benchmark": "tf_data_autotune", "train_images": n, "batch": args.batch, "epochs_per_fit": args.epochs,
        "rounds": args.rounds, "precision": policy, "cpu_count": os.cpu_count(), "tensorflow": tf.__version__,
        "results": {s: {"train_images_per_s": median[s],
                        "median_epoch_seconds": statistics.median(e for f in fits[s] for e in f["epoch_seconds"]),
                        "fits": fits[s]} for s in fits},
        "off_speedup": round(median["off"] / median["on"], 3),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
