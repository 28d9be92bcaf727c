"""What the loader benchmarks share: the U-Net ``train-segmenter`` builds, trained by
``model.fit`` through the real loader (``segmentation_dataset``, augmentation on), with
every epoch timed. Used by ``tf_data_autotune.py`` and ``determinism.py``."""

from __future__ import annotations

import statistics
import time
from typing import Any


def add_model_arguments(ap) -> None:
    """The data and model flags (defaults: the CLI's)."""
    from tf_bus.config import PRECISIONS, SegmenterConfig

    d = SegmenterConfig()
    ap.add_argument("data", help="a tf-bus prepare output, the segmentation layout, or a raw BUSI release")
    ap.add_argument("--epochs", type=int, default=5, help="timed epochs per fit (default: 5)")
    ap.add_argument("--rounds", type=int, default=2, help="fits per setting, the settings alternating (default: 2)")
    ap.add_argument("--size", type=int, default=d.image_size[0], help="square input side (default: the CLI's)")
    ap.add_argument("--depth", type=int, default=d.depth, help="U-Net depth (default: the CLI's)")
    ap.add_argument("--base-filters", type=int, default=d.base_filters, help="U-Net base filters (default: the CLI's)")
    ap.add_argument("--batch", type=int, default=d.batch_size, help="batch size (default: the CLI's)")
    ap.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                    help="float32, mixed_bfloat16 or auto, as train-segmenter (default: the CLI's)")


def check_counts(ap, args) -> None:
    for flag in ("epochs", "rounds", "batch"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")


def segmenter_config(args, **fields):
    from tf_bus.config import SegmenterConfig

    return SegmenterConfig(image_size=(args.size, args.size), depth=args.depth, base_filters=args.base_filters,
                           batch_size=args.batch, precision=args.precision, **fields)


def train_dataset(data, config, **loader_overrides):
    """The train split as ``train-segmenter`` reads it, and its number of images."""
    from tf_bus.data.pipeline import count_segmentation_examples, segmentation_dataset
    from tf_bus.training.segmentation import loader_config

    n = count_segmentation_examples(data, "train", lesion_only=config.lesion_only)
    ds = segmentation_dataset(data, "train", loader_config(config, augment=True, lesion_only=config.lesion_only,
                                                           **loader_overrides), training=True)
    return ds, n


def compiled_segmenter(config, steps: int):
    """The run's U-Net, compiled with a constant learning rate, optimizer built."""
    from tf_bus.models.losses import get_loss
    from tf_bus.training.common import build_before_fit, make_optimizer
    from tf_bus.training.segmentation import build_segmenter

    model = build_segmenter(config)
    model.compile(optimizer=make_optimizer(config.learning_rate, "constant", 0, 1, steps, config.weight_decay),
                  loss=get_loss(config.loss), jit_compile=False)
    build_before_fit(model)
    return model


def timed_fit(model, ds, n: int, epochs: int) -> dict[str, Any]:
    """``epochs`` epochs of ``fit``: training images/s over the whole fit, and each epoch's seconds."""
    import keras

    class EpochTimes(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(round(time.perf_counter() - self.t0, 3))

    timer = EpochTimes()
    t = time.perf_counter()
    model.fit(ds, epochs=epochs, verbose=0, callbacks=[timer])
    wall = time.perf_counter() - t
    return {"train_images_per_s": round(n * epochs / wall, 2), "epoch_seconds": timer.seconds}


def per_setting(fits: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, float], dict[str, Any]]:
    """The median images/s of each setting's fits, and the ``results`` JSON: per setting that
    median, the median epoch over all its fits, and the fits themselves."""
    median = {s: round(statistics.median(f["train_images_per_s"] for f in fits[s]), 2) for s in fits}
    results = {s: {"train_images_per_s": median[s],
                   "median_epoch_seconds": statistics.median(e for f in fits[s] for e in f["epoch_seconds"]),
                   "fits": fits[s]} for s in fits}
    return median, results
