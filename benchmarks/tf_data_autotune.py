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
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_loader import (add_model_arguments, check_counts, compiled_segmenter,  # noqa: E402  (benchmarks/)
                         per_setting, segmenter_config, timed_fit, train_dataset)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(ap)
    args = ap.parse_args()
    check_counts(ap, args)

    from tf_bus.tflog import import_tensorflow

    tf = import_tensorflow()  # without the start-up lines TF_CPP_MIN_LOG_LEVEL hides (README, "Installing")
    import keras

    from tf_bus.training.precision import set_precision

    config = segmenter_config(args)
    policy = set_precision(config.precision)
    datasets = {}
    for setting in ("off", "on"):
        datasets[setting], n = train_dataset(args.data, config, autotune=setting == "on")
    model = compiled_segmenter(config, int(datasets["off"].cardinality()))
    model.fit(datasets["off"], epochs=1, verbose=0)  # trace the step, fill the loaders' caches
    model.fit(datasets["on"], epochs=1, verbose=0)
    fits: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for setting in ("off", "on"):
            fits[setting].append(timed_fit(model, datasets[setting], n, args.epochs))
    keras.mixed_precision.set_global_policy("float32")
    median, results = per_setting(fits)
    out = {
        "benchmark": "tf_data_autotune", "train_images": n, "batch": args.batch, "epochs_per_fit": args.epochs,
        "rounds": args.rounds, "precision": policy, "cpu_count": os.cpu_count(), "tensorflow": tf.__version__,
        "results": results, "off_speedup": round(median["off"] / median["on"], 3),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
