"""The U-Net: shapes for every variant, config round trip, saving, a few steps of training."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tf_bus.config import LoaderConfig
from tf_bus.data.pipeline import segmentation_dataset
from tf_bus.models.losses import get_loss
from tf_bus.models.metrics import DiceScore
from tf_bus.models.unet import UNet

CASES = [
    # (kwargs, input shape, expected output shape)
    (dict(image_size=(32, 32), channels=3, depth=2, base_filters=8), (2, 32, 32, 3), (2, 32, 32, 1)),
    (dict(image_size=(32, 48), channels=1, depth=3, base_filters=8, upsampling="resize"), (2, 32, 48, 1), (2, 32, 48, 1)),
    (dict(image_size=(None, None), channels=1, depth=2, base_filters=8), (1, 64, 32, 1), (1, 64, 32, 1)),
    (dict(image_size=(188, 188), channels=1, depth=2, base_filters=8, padding="valid"), (1, 188, 188, 1), (1, 148, 148, 1)),
    (dict(image_size=(32, 32), depth=1, base_filters=4, batch_norm=False, dropout=0.0), (2, 32, 32, 3), (2, 32, 32, 1)),
]


@pytest.mark.parametrize("kwargs,in_shape,out_shape", CASES)
def test_output_shapes_and_range(kwargs, in_shape, out_shape):
    model = UNet(**kwargs)
    y = model.predict(np.random.rand(*in_shape).astype("float32"), verbose=0)
    assert y.shape == out_shape
    assert 0.0 <= y.min() and y.max() <= 1.0


@pytest.mark.parametrize("kwargs,in_shape,out_shape", CASES[:2])
def test_config_round_trip_and_save(kwargs, in_shape, out_shape, tmp_path):
    model = UNet(**kwargs)
    assert UNet.from_config(model.get_config()).get_config() == model.get_config()
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    x = np.random.rand(*in_shape).astype("float32")
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_every_layer_is_named_after_its_block():
    model = UNet(image_size=(32, 32), depth=2, base_filters=4)
    names = [layer.name for layer in model.layers]
    assert "down0_conv1" in names and "bottleneck_conv2" in names and "up0_concat" in names
    assert names[-1] == "mask"


ILL_CASES = [
    (dict(channels=2), "channels"),
    (dict(depth=0), "depth"),
    (dict(upsampling="nearest"), "upsampling"),
    (dict(padding="full"), "padding"),
    (dict(image_size=(None, None), padding="valid"), "static image_size"),
    (dict(image_size=(100, 100), depth=4), "divisible"),
]


@pytest.mark.parametrize("kwargs,message", ILL_CASES)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(**kwargs)


@pytest.mark.parametrize("loss", ["bce", "dice", "bce_dice", "focal_tversky"])
def test_a_few_steps_lower_the_loss(loss, prepared):
    keras.utils.set_random_seed(1)
    cfg = LoaderConfig(image_size=(32, 32), batch_size=8, shuffle=False, augment=False)
    x, y = (t.numpy() for t in next(iter(segmentation_dataset(prepared, "train", cfg))))
    model = UNet(image_size=(32, 32), depth=2, base_filters=8)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=get_loss(loss), metrics=[DiceScore()])
    history = model.fit(x, y, epochs=12, batch_size=8, verbose=0).history["loss"]
    # Training-mode losses (inference mode would use BatchNorm statistics not yet settled).
    assert min(history[-3:]) < history[0], (loss, history)
