"""Reads back what the callbacks wrote to TensorBoard (for tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_overlays(log_dir) -> dict[int, np.ndarray]:
    """``{epoch: strips (N, H, 3W, C) in [0, 1]}`` from ``log_dir/overlays`` (MaskOverlays)."""
    import tensorflow as tf

    out = {}
    for path in sorted((Path(log_dir) / "overlays").glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                encoded = tf.make_ndarray(value.tensor)[2:]  # width, height, then one PNG per image
                out[event.step] = np.stack([tf.io.decode_png(png).numpy() for png in encoded]) / 255.0
    return out
