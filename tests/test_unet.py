"""The U-Net: shapes for every variant, config round trip, saving, a few steps of training."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tf_bus.config import LoaderConfig
from tf_bus.data.pipeline import segmentation_dataset
from tf_bus.models.losses import get_loss
from tf_bus.models.metrics import DiceScore
from tf_bus.models.unet import DeepSupervision, TransformerBlock, UNet, deep_supervision_weights

CASES = [
    # (kwargs, input shape, expected output shape)
    (dict(image_size=(32, 32), channels=3, depth=2, base_filters=8), (2, 32, 32, 3), (2, 32, 32, 1)),
    (dict(image_size=(32, 48), channels=1, depth=3, base_filters=8, upsampling="resize"), (2, 32, 48, 1), (2, 32, 48, 1)),
    (dict(image_size=(None, None), channels=1, depth=2, base_filters=8), (1, 64, 32, 1), (1, 64, 32, 1)),
    (dict(image_size=(188, 188), channels=1, depth=2, base_filters=8, padding="valid"), (1, 188, 188, 1), (1, 148, 148, 1)),
    (dict(image_size=(32, 32), depth=1, base_filters=4, batch_norm=False, dropout=0.0), (2, 32, 32, 3), (2, 32, 32, 1)),
    (dict(image_size=(32, 32), channels=1, depth=2, base_filters=8, attention_gates=True, transformer_blocks=2,
          transformer_heads=2), (2, 32, 32, 1), (2, 32, 32, 1)),
    (dict(image_size=(None, None), channels=1, depth=2, base_filters=8, attention_gates=True, transformer_blocks=1),
     (1, 64, 32, 1), (1, 64, 32, 1)),
    (dict(image_size=(188, 188), channels=1, depth=2, base_filters=8, padding="valid", attention_gates=True,
          transformer_blocks=1), (1, 188, 188, 1), (1, 148, 148, 1)),
]


@pytest.mark.parametrize("kwargs,in_shape,out_shape", CASES)
def test_output_shapes_and_range(kwargs, in_shape, out_shape):
    model = UNet(**kwargs)
    y = model.predict(np.random.rand(*in_shape).astype("float32"), verbose=0)
    assert y.shape == out_shape
    assert 0.0 <= y.min() and y.max() <= 1.0


@pytest.mark.parametrize("kwargs,in_shape,out_shape", CASES[:2] + CASES[5:6])
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
    assert not any("attention" in n or "transformer" in n for n in names)
    model = UNet(image_size=(32, 32), depth=2, base_filters=4, attention_gates=True, transformer_blocks=2)
    names = [layer.name for layer in model.layers]
    for level in (0, 1):
        assert f"up{level}_attention_alpha" in names and f"up{level}_attention_gate" in names
    assert [n for n in names if "transformer" in n] == ["bottleneck_transformer0", "bottleneck_transformer1"]


ILL_CASES = [
    (dict(channels=2), "channels"),
    (dict(depth=0), "depth"),
    (dict(upsampling="nearest"), "upsampling"),
    (dict(padding="full"), "padding"),
    (dict(image_size=(None, None), padding="valid"), "static image_size"),
    (dict(image_size=(100, 100), depth=4), "divisible"),
    (dict(transformer_blocks=-1), "transformer_blocks"),
    (dict(depth=2, base_filters=6, transformer_blocks=1, transformer_heads=5), "transformer_heads"),
]


@pytest.mark.parametrize("kwargs,message", ILL_CASES)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(**kwargs)


@pytest.mark.parametrize("loss,attention", [("bce", {}), ("dice", {}), ("bce_dice", {}), ("focal_tversky", {}),
                                            ("boundary_bce_dice", {}), ("bce_dice", dict(attention_gates=True, transformer_blocks=2))])
def test_a_few_steps_lower_the_loss(loss, attention, prepared):
    keras.utils.set_random_seed(1)
    cfg = LoaderConfig(image_size=(32, 32), batch_size=8, shuffle=False, augment=False)
    x, y = (t.numpy() for t in next(iter(segmentation_dataset(prepared, "train", cfg))))
    model = UNet(image_size=(32, 32), depth=2, base_filters=8, **attention)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=get_loss(loss), metrics=[DiceScore()])
    history = model.fit(x, y, epochs=12, batch_size=8, verbose=0).history["loss"]
    # Training-mode losses (inference mode would use BatchNorm statistics not yet settled).
    assert min(history[-3:]) < history[0], (loss, history)


def _gate_outputs(model, x):
    """(skip, coefficients, gated skip) of the finest level's attention gate."""
    probe = keras.Model(model.input, [model.get_layer("down0_relu2").output, model.get_layer("up0_attention_alpha").output,
                                      model.get_layer("up0_attention_gate").output])
    return [np.asarray(t, dtype="float32") for t in probe(x, training=False)]


def test_attention_gate_scales_each_position_of_the_skip():
    keras.utils.set_random_seed(3)
    model = UNet(image_size=(32, 32), channels=1, depth=2, base_filters=4, attention_gates=True)
    skip, alpha, gated = _gate_outputs(model, np.random.rand(2, 32, 32, 1).astype("float32"))
    assert alpha.shape == (2, 32, 32, 1) and 0.0 < alpha.min() and alpha.max() < 1.0
    assert alpha.std() > 0, "one coefficient per position, not one for the map"
    np.testing.assert_allclose(gated, skip * alpha, rtol=1e-5, atol=1e-6)


def test_transformer_block_starts_as_the_identity_and_sees_every_position():
    keras.utils.set_random_seed(4)
    x = np.random.rand(2, 4, 6, 8).astype("float32")
    identity = TransformerBlock(num_heads=2, layer_scale=0.0)
    np.testing.assert_array_equal(np.asarray(identity(x)), x)
    default = TransformerBlock(num_heads=2)
    assert 0 < np.abs(np.asarray(default(x)) - x).max() < 1e-2, "LayerScale 1e-4: close to the identity"
    # Trained weights (here: a scale of 1 and a random position kernel): a change at one corner
    # reaches the opposite corner, beyond a 3x3 convolution's reach.
    block = TransformerBlock(num_heads=2, layer_scale=1.0)
    block.build(x.shape)
    block.position.kernel.assign(np.random.normal(size=(3, 3, 8, 1)).astype("float32"))
    moved = x.copy()
    moved[:, 0, 0, :] += 1.0
    delta = np.abs(np.asarray(block(moved)) - np.asarray(block(x)))
    assert delta[:, -1, -1, :].max() > 1e-4
    again = TransformerBlock.from_config(block.get_config())
    assert again.get_config() == block.get_config()


@pytest.mark.parametrize("bad", [dict(num_heads=0), dict(mlp_ratio=0)])
def test_transformer_block_bad_arguments(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TransformerBlock(**bad)


@pytest.mark.parametrize("levels,weights", [(1, [2 / 3, 1 / 3]), (2, [4 / 7, 2 / 7, 1 / 7]),
                                            (3, [8 / 15, 4 / 15, 2 / 15, 1 / 15])])
def test_deep_supervision_weights_halve_per_level_and_sum_to_one(levels, weights):
    np.testing.assert_allclose(deep_supervision_weights(levels), weights)


def _supervised_pair(levels=2, **kwargs):
    keras.utils.set_random_seed(5)
    unet = UNet(image_size=(32, 32), channels=1, depth=3, base_filters=4, **kwargs)
    model = DeepSupervision(unet, levels)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=get_loss("bce_dice"), metrics=[DiceScore()])
    return unet, model


def test_deep_supervision_loss_is_the_weighted_loss_of_every_output_against_the_pooled_mask():
    unet, model = _supervised_pair(levels=2)
    rng = np.random.default_rng(0)
    x = rng.random((4, 32, 32, 1), dtype=np.float32)
    y = np.zeros((4, 32, 32, 1), np.float32)
    y[:, 5:19, 9:30] = 1.0  # not aligned with the 4x4 cells: pooled targets are fractions
    loss, main = model.supervised_loss(x, y, training=False)
    np.testing.assert_allclose(np.asarray(main), np.asarray(unet(x, training=False)), atol=1e-6)
    # By hand: each head on its decoder block's output, each target the mean of the mask over its cells.
    feats = keras.Model(unet.input, [unet.get_layer("up1_relu2").output, unet.get_layer("up2_relu2").output])(x)
    pooled = [y.reshape(4, 32 // s, s, 32 // s, s, 1).mean(axis=(2, 4)) for s in (2, 4)]
    assert np.unique(pooled[1]).size > 2, "some cells are partly lesion"
    ce = get_loss("bce_dice")
    expected = (4 / 7 * float(ce(y, unet(x, training=False))) + 2 / 7 * float(ce(pooled[0], model.heads[0](feats[0])))
                + 1 / 7 * float(ce(pooled[1], model.heads[1](feats[1]))))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert model.heads[0](feats[0]).shape == (4, 16, 16, 1) and model.heads[1](feats[1]).shape == (4, 8, 8, 1)


def test_deep_supervision_trains_the_heads_and_the_unet_and_is_called_as_the_unet(prepared, tmp_path):
    unet, model = _supervised_pair(levels=2)
    cfg = LoaderConfig(image_size=(32, 32), channels=1, batch_size=8, shuffle=False, augment=False)
    x, y = (t.numpy() for t in next(iter(segmentation_dataset(prepared, "train", cfg))))
    heads_before = [np.array(h.kernel) for h in model.heads]
    first_before = np.array(unet.get_layer("down0_conv1").kernel)
    history = model.fit(x, y, epochs=12, batch_size=8, verbose=0).history
    assert min(history["loss"][-3:]) < history["loss"][0] and "dice" in history
    assert all(not np.allclose(b, np.array(h.kernel)) for b, h in zip(heads_before, model.heads))
    assert not np.allclose(first_before, np.array(unet.get_layer("down0_conv1").kernel))
    # Calling, evaluating and saving the U-Net: one output, no auxiliary layer in the saved model.
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(unet(x)), atol=1e-6)
    assert set(model.evaluate(x, y, verbose=0, return_dict=True)) == {"loss", "dice"}
    unet.save(tmp_path / "unet.keras")
    loaded = keras.saving.load_model(tmp_path / "unet.keras")
    assert type(loaded) is UNet and not [l for l in loaded.layers if l.name.startswith("aux")]
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(unet(x)), atol=1e-6)
    # The wrapper itself round-trips too (heads included).
    model.save(tmp_path / "supervised.keras")
    again = keras.saving.load_model(tmp_path / "supervised.keras")
    assert type(again) is DeepSupervision and again.levels == 2
    np.testing.assert_allclose(np.array(again.heads[1].kernel), np.array(model.heads[1].kernel))


@pytest.mark.parametrize("unet_kwargs,levels,message", [
    (dict(image_size=(32, 32), depth=3), 0, r"`levels` must be >= 1"),
    (dict(image_size=(32, 32), depth=3), 3, r"within 1..depth-1 = 1..2"),
    (dict(image_size=(188, 188), depth=2, padding="valid"), 1, "padding='same'"),
])
def test_deep_supervision_bad_arguments(unet_kwargs, levels, message):
    with pytest.raises(ValueError, match=message):
        DeepSupervision(UNet(channels=1, base_filters=4, **unet_kwargs), levels)


def test_deep_supervision_needs_a_loss_object_it_can_call_on_every_output():
    model = DeepSupervision(UNet(image_size=(32, 32), channels=1, depth=3, base_filters=4), 1)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x = np.zeros((2, 32, 32, 1), np.float32)
    with pytest.raises(TypeError, match="keras.losses.Loss instance"):
        model.fit(x, x, epochs=1, verbose=0)
