"""Loader throughput: tf-bus tf.data loader vs a plain PIL-in-a-Python-loop baseline.

Both read the same images and masks (the segmentation pairs of a BUSI release),
resize to the same size and produce float32 arrays, in the same process; the order
alternates between repeats and the median is reported. Prints JSON.

    python benchmarks/loader_throughput.py [--data ../shared/busi] [--size 256] [--repeats 3]

"cold" is the loader's first epoch (decode + resize, parallel); "cached" are the
later epochs of a training run (decoded images cached in memory, augmentation and
batching still run each epoch). The baseline has no cache: a plain loop re-reads
the files every epoch, which is what the loader replaces.

``--copy-paste P`` also times the cached epochs with the U-Net's copy-paste augmentation
on the batches (``tf_bus.training.segmentation.copy_paste``), alternating with the
loader without it, and reports the ratio. ``--intensity`` does the same for nnU-Net's
intensity augmentations (``--gamma 0.5 --noise 0.05 --blur 1.0`` on top of the default
ranges; implies ``--augment``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pil_loop(cases, size: int) -> int:
    """The baseline: open, convert, resize, to float32, one image at a time."""
    n = 0
    for case in cases:
        with Image.open(case.image_path) as im:
            x = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), np.float32) / 255.0
        m = None
        for p in case.mask_paths:
            with Image.open(p) as mim:
                a = np.asarray(mim.convert("L").resize((size, size), Image.NEAREST)) > 127
            m = a if m is None else (m | a)
        assert x.shape == (size, size, 3) and m is not None
        n += 1
    return n


#: nnU-Net's intensity ranges, as `--intensity` adds them (README, "Intensity augmentation").
INTENSITY = dict(gamma=0.5, noise=0.05, blur=1.0)


def loader_epochs(data, size: int, batch: int, epochs: int, augment: bool,
                  copy_paste: float = 0.0, intensity: bool = False) -> list[tuple[int, float]]:
    from tf_bus.config import AugmentConfig, LoaderConfig
    from tf_bus.data.pipeline import segmentation_dataset
    from tf_bus.training.segmentation import copy_paste as paste

    cfg = LoaderConfig(image_size=(size, size), batch_size=batch, shuffle=augment, augment=augment,
                       augmentation=AugmentConfig(**INTENSITY) if intensity else AugmentConfig())
    ds = segmentation_dataset(data, "all", cfg)
    if copy_paste:
        ds = paste(ds, copy_paste, seed=1)
    out = []
    for _ in range(epochs):
        t = time.perf_counter()
        n = sum(int(x.shape[0]) for x, _ in ds)
        out.append((n, time.perf_counter() - t))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "busi"), help="BUSI release (or its parent)")
    ap.add_argument("--size", type=int, default=256, help="output side in pixels (default: 256)")
    ap.add_argument("--batch", type=int, default=16, help="loader batch size (default: 16)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each measurement (default: 3)")
    ap.add_argument("--augment", action="store_true", help="loader also shuffles and augments (training mode)")
    ap.add_argument("--copy-paste", type=float, default=0.0, metavar="P",
                    help="also time the cached epochs with copy-paste at probability P on the batches (default: 0, off)")
    ap.add_argument("--intensity", action="store_true",
                    help="also time the cached epochs with --gamma 0.5 --noise 0.05 --blur 1.0 added to the "
                         "augmentation (implies --augment)")
    args = ap.parse_args()
    args.augment = args.augment or args.intensity

    from tf_bus.tflog import import_tensorflow

    tf = import_tensorflow()  # without the start-up lines TF_CPP_MIN_LOG_LEVEL hides (README, "Installing")

    from tf_bus.data.busi import scan_release

    cases = scan_release(args.data).cases
    base, cold, cached, pasted, intense = [], [], [], [], []
    extra = (("paste",) if args.copy_paste else ()) + (("intensity",) if args.intensity else ())
    for r in range(args.repeats):
        order = ("loader", "pil") if r % 2 == 0 else ("pil", "loader")
        order = (*order, *extra) if r % 2 == 0 else (*extra, *order)
        for which in order:
            if which == "paste":
                epochs = loader_epochs(args.data, args.size, args.batch, 3, args.augment, args.copy_paste)
                pasted.append(statistics.median(n / s for n, s in epochs[1:]))
            elif which == "intensity":
                epochs = loader_epochs(args.data, args.size, args.batch, 3, args.augment, intensity=True)
                intense.append(statistics.median(n / s for n, s in epochs[1:]))
            elif which == "pil":
                t = time.perf_counter()
                n = pil_loop(cases, args.size)
                base.append(n / (time.perf_counter() - t))
            else:
                epochs = loader_epochs(args.data, args.size, args.batch, 3, args.augment)
                cold.append(epochs[0][0] / epochs[0][1])
                cached.append(statistics.median(n / s for n, s in epochs[1:]))
    med = statistics.median
    extras = {} if not args.copy_paste else {
        "copy_paste": args.copy_paste,
        "loader_cached_epoch_copy_paste_images_per_s": round(med(pasted), 1),
        "copy_paste_over_cached": round(med(pasted) / med(cached), 2),
    }
    if args.intensity:
        extras |= {"intensity": INTENSITY,
                  "loader_cached_epoch_intensity_images_per_s": round(med(intense), 1),
                  "intensity_over_cached": round(med(intense) / med(cached), 2)}
    print(json.dumps({
        "benchmark": "loader_throughput",
        "data": str(Path(args.data).resolve()),
        "images": len(cases),
        "size": args.size,
        "augment": args.augment,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "tensorflow": tf.__version__,
        "repeats": args.repeats,
        "baseline_pil_loop_images_per_s": round(med(base), 1),
        "loader_cold_epoch_images_per_s": round(med(cold), 1),
        "loader_cached_epoch_images_per_s": round(med(cached), 1),
        "speedup_cold": round(med(cold) / med(base), 2),
        "speedup_cached": round(med(cached) / med(base), 2),
        **extras,
        "all_runs": {"baseline": [round(v, 1) for v in base], "cold": [round(v, 1) for v in cold],
                     "cached": [round(v, 1) for v in cached], "copy_paste": [round(v, 1) for v in pasted],
                     "intensity": [round(v, 1) for v in intense]},
    }, indent=2))


if __name__ == "__main__":
    main()
