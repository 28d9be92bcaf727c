"""MaskOverlays writes what the model predicts, on the epochs it is told to."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from tensorboard_events import read_overlays

from tf_bus.training.callbacks import MaskOverlays


def tiny_segmenter():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    return model


@pytest.mark.parametrize("every, epochs, expected", [(1, 3, [0, 1, 2]), (2, 3, [0, 2]), (5, 3, [0])])
def test_overlays_hold_image_truth_and_the_models_prediction(every, epochs, expected, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(6, 16, 16, 1)).astype("float32")
    masks = (images > 0.5).astype("float32")
    model = tiny_segmenter()
    snapshots = {}

    class Snapshot(keras.callbacks.Callback):  # the model's own prediction after each epoch
        def on_epoch_end(self, epoch, logs=None):
            snapshots[epoch] = np.asarray(self.model(images[:3], training=False))

    overlays = MaskOverlays(images[:3], masks[:3], str(tmp_path), every=every)
    model.fit(images, masks, epochs=epochs, batch_size=2, verbose=0, callbacks=[Snapshot(), overlays])
    written = read_overlays(tmp_path)
    assert sorted(written) == expected
    for epoch, strip in written.items():
        assert strip.shape == (3, 16, 48, 1)
        np.testing.assert_allclose(strip[:, :, :16], images[:3], atol=1 / 255)
        np.testing.assert_array_equal(strip[:, :, 16:32], masks[:3])
        np.testing.assert_allclose(strip[:, :, 32:], snapshots[epoch], atol=1 / 255)
