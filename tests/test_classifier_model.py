"""The ResNet classifier: every backbone, each weights option, freezing, the offline error."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from conftest import TEST_BACKBONE
from tf_bus.config import BACKBONE_BLOCKS
from tf_bus.data.busi import TfBusError
from tf_bus.models import classifier as clf
from tf_bus.models.classifier import ResNetPreprocess, build_classifier, resolve_weights, set_trainable_stages


@pytest.mark.parametrize("backbone", ["resnet50", "resnet101", "resnet14", "resnet26"])
@pytest.mark.parametrize("channels", [1, 3])
def test_builds_and_outputs_probabilities(backbone, channels):
    model = build_classifier(backbone, None, image_size=(64, 64), channels=channels)
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, channels)).astype("float32")
    p = model.predict(x, verbose=0)
    assert p.shape == (2, 3) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    base = model.get_layer("backbone")
    blocks = BACKBONE_BLOCKS[backbone]
    for stage, n in zip(clf.STAGES, blocks):  # the stages hold the backbone's bottleneck blocks
        assert {l.name.split("_")[1] for l in base.layers if l.name.startswith(stage + "_")} == {
            f"block{b}" for b in range(1, n + 1)}
    assert base.output.shape[1:] == (2, 2, 2048)


def test_bottleneck_resnet_is_keras_resnet50_layer_for_layer(tmp_path):
    """(3, 4, 6, 3) blocks rebuild keras.applications.ResNet50: the same layers, names and
    configs, its weights file loads, and the features are equal; so resnet14/26 are the same
    family with fewer blocks, and everything keyed on ResNet50's layer names holds for them."""
    keras_resnet = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3))
    ours = clf.bottleneck_resnet((3, 4, 6, 3), (64, 64, 3))
    pairs = list(zip(keras_resnet.layers[1:], ours.layers[1:]))  # [0]: an auto-named input
    assert len(keras_resnet.layers) == len(ours.layers) == 175
    assert all(a.name == b.name and type(a) is type(b) and a.get_config() == b.get_config() for a, b in pairs)
    path = tmp_path / "resnet50_notop.weights.h5"
    keras_resnet.save_weights(path)
    ours.load_weights(path)
    x = np.random.default_rng(2).uniform(-1, 1, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_array_equal(ours(x, training=False), keras_resnet(x, training=False))


@pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")  # Keras, on the mismatched file
@pytest.mark.parametrize("backbone,blocks,params", [("resnet14", 4, 8_044_928), ("resnet26", 8, 13_992_448)])
def test_small_backbones_save_load_and_take_their_own_weights(tmp_path, backbone, blocks, params):
    """A resnet14/26 backbone's weights, saved from a trained model, are a --weights file for
    the next run (there are no ImageNet weights for them: a clear error says so)."""
    model = build_classifier(backbone, None, image_size=(64, 64))
    base = model.get_layer("backbone")
    assert base.count_params() == params
    assert len([l for l in base.layers if l.name.endswith("_add")]) == blocks
    rng = np.random.default_rng(3)
    base.set_weights([w + rng.normal(0, 0.1, w.shape).astype(w.dtype) for w in base.get_weights()])
    path = tmp_path / f"{backbone}_backbone.weights.h5"
    base.save_weights(path)
    again = build_classifier(backbone, str(path), image_size=(64, 64))
    for a, b in zip(again.get_layer("backbone").get_weights(), base.get_weights()):
        np.testing.assert_array_equal(a, b)
    saved = tmp_path / "model.keras"
    model.save(saved)
    reloaded = keras.saving.load_model(saved)
    x = rng.uniform(0, 255, (2, 64, 64, 1)).astype("float32")
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6)
    other = "resnet26" if backbone == "resnet14" else "resnet14"
    with pytest.raises(TfBusError, match=f"cannot load it as {other} backbone weights.*save_weights"):
        build_classifier(other, str(path), image_size=(64, 64))
    with pytest.raises(TfBusError, match=f"no ImageNet weights for {backbone}.*resnet50 and resnet101 only"):
        build_classifier(backbone, "imagenet", image_size=(64, 64))


def test_local_weights_file_is_loaded(tmp_path):
    source = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3))
    path = tmp_path / "resnet50_notop.weights.h5"
    source.save_weights(path)
    model = build_classifier("resnet50", str(path), image_size=(64, 64))
    got = model.get_layer("backbone").get_layer("conv1_conv").get_weights()[0]
    np.testing.assert_array_equal(got, source.get_layer("conv1_conv").get_weights()[0])
    # Pre-trained BatchNorm keeps keras.applications' momentum; a from-scratch one gets 0.9.
    scratch = build_classifier("resnet50", None, image_size=(64, 64), bn_momentum=0.9)
    for m, expected in ((model, 0.99), (scratch, 0.9)):
        bns = [l for l in m.get_layer("backbone").layers if isinstance(l, keras.layers.BatchNormalization)]
        assert len(bns) == 53 and {l.momentum for l in bns} == {expected}


@pytest.mark.parametrize("fused,bn_class", [(True, "tf_bus.models.normalization"), (False, "keras")])
def test_backbone_batch_norm_is_fused_by_default_and_keeps_the_loaded_weights(tmp_path, fused, bn_class):
    source = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3))
    rng = np.random.default_rng(6)
    source.set_weights([w + rng.normal(0, 0.1, w.shape).astype(w.dtype) for w in source.get_weights()])
    path = tmp_path / "resnet50_notop.weights.h5"
    source.save_weights(path)
    model = build_classifier("resnet50", str(path), image_size=(64, 64), channels=3, fused_batch_norm=fused)
    base = model.get_layer("backbone")
    bns = [l for l in base.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bns) == 53 and {type(l).__module__.split(".")[0] for l in bns} == {bn_class.split(".")[0]}
    assert [l.name for l in base.layers][1:] == [l.name for l in source.layers][1:]  # [0]: an auto-named input
    for a, b in zip(base.get_weights(), source.get_weights()):  # every weight, moving statistics included
        np.testing.assert_array_equal(a, b)
    x = rng.uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    features = source(keras.applications.resnet.preprocess_input(x.copy()), training=False)
    np.testing.assert_allclose(base(clf.ResNetPreprocess()(x), training=False), features, rtol=1e-4, atol=1e-4)


def test_preprocessing_matches_keras_applications():
    x = np.random.default_rng(1).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    ref = keras.applications.resnet.preprocess_input(x.copy())
    np.testing.assert_allclose(ResNetPreprocess()(x), ref, rtol=1e-6, atol=1e-4)


def test_offline_imagenet_fails_fast_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # no cached weights
    monkeypatch.setattr(clf, "_WEIGHTS_HOST", ("127.0.0.1", 9))  # nothing listens: refused at once
    with pytest.raises(TfBusError, match="--weights PATH") as err:
        resolve_weights("resnet50", "imagenet")
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in str(err.value)


ILL = [("resnet18", None, "Unknown backbone"), ("resnet50", "/nope/w.h5", "no such weights file")]


@pytest.mark.parametrize("backbone,weights,message", ILL)
def test_bad_weights_options(backbone, weights, message):
    with pytest.raises(TfBusError, match=message):
        resolve_weights(backbone, weights)


@pytest.mark.parametrize("stages,open_prefixes", [(0, ()), (1, ("conv5",)), (2, ("conv4", "conv5")),
                                                  (4, ("conv2", "conv3", "conv4", "conv5"))])
def test_freezing_stages_keeps_batchnorm_frozen(stages, open_prefixes):
    model = build_classifier("resnet50", None, image_size=(64, 64))
    set_trainable_stages(model, stages)
    for layer in model.get_layer("backbone").layers:
        if not layer.weights:
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not layer.trainable, layer.name
        else:
            assert layer.trainable == layer.name.startswith(tuple(p + "_" for p in open_prefixes)), layer.name
    assert model.get_layer("probabilities").trainable


def test_from_scratch_trains_every_layer_batchnorm_included():
    model = build_classifier("resnet50", None, image_size=(64, 64))
    set_trainable_stages(model, 0)
    set_trainable_stages(model, None)
    bns = [l for l in model.get_layer("backbone").layers if isinstance(l, keras.layers.BatchNormalization)]
    assert bns and all(l.trainable for l in bns)
    assert len(model.trainable_weights) == len([w for w in model.weights if "moving" not in w.path])


def _bce(t, p):
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


@pytest.mark.parametrize("known", [1.0, 0.0])
def test_lesion_mask_loss_by_hand(known):
    # A 2x2 head output against a 4x4 mask: the mask is area-resized to 2x2 (soft targets),
    # then per image BCE from logits + soft Dice (smooth 1), times `known`, times the weight.
    from tf_bus.models.classifier import LesionMaskLoss

    logits = np.array([0.0, 2.0, -1.0, 1.0], np.float32).reshape(1, 2, 2, 1)
    mask = np.zeros((1, 4, 4, 1), np.float32)
    mask[0, :2, :2] = 1.0      # top-left quarter: target 1
    mask[0, :2, 2:3] = 1.0     # half of the top-right quarter: target 0.5
    t = np.array([1.0, 0.5, 0.0, 0.0])
    p = 1 / (1 + np.exp(-logits.reshape(-1)))
    bce = _bce(t, p).mean()
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    layer = LesionMaskLoss(weight=0.5)
    probs = np.array([[0.2, 0.3, 0.5]], np.float32)
    out = layer(probs, logits, mask, np.array([known], np.float32))
    np.testing.assert_allclose(np.asarray(out), probs)
    assert len(layer.losses) == 1
    np.testing.assert_allclose(float(layer.losses[0]), 0.5 * known * (bce + dice), rtol=1e-5)
    assert LesionMaskLoss.from_config(layer.get_config()).weight == 0.5


def test_lesion_head_training_model_and_its_classifier(tmp_path):
    from tf_bus.models.classifier import inference_model

    model = build_classifier("resnet50", None, image_size=(64, 64), channels=1, mask_loss_weight=1.0)
    assert set(model.input) == {"image", "lesion_mask", "mask_known"}
    assert model.get_layer("lesion_logits").output.shape == (None, 4, 4, 1)  # conv4: stride 16
    set_trainable_stages(model, None)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = {"image": rng.random((4, 64, 64, 1), np.float32) * 255,
         "lesion_mask": (rng.random((4, 64, 64, 1)) > 0.5).astype(np.float32), "mask_known": np.ones(4, np.float32)}
    y = keras.utils.to_categorical([0, 1, 2, 0], 3)
    with_head = model.evaluate(x, y, verbose=0)
    without = model.evaluate({**x, "mask_known": np.zeros(4, np.float32)}, y, verbose=0)
    assert with_head > without + 0.1  # the head's loss joins the total only where the mask is known
    clf = inference_model(model)
    assert clf.input_shape == (None, 64, 64, 1) and clf.output_shape == (None, 3)
    assert not any(l.name.startswith("lesion") for l in clf.layers)
    np.testing.assert_allclose(clf.predict(x["image"], verbose=0), model.predict(x, verbose=0), atol=1e-6)
    clf.save(tmp_path / "clf.keras")
    again = keras.saving.load_model(tmp_path / "clf.keras")
    np.testing.assert_allclose(again.predict(x["image"], verbose=0), clf.predict(x["image"], verbose=0), atol=1e-6)
    assert inference_model(clf) is clf


def test_lesion_attention_pool_by_hand():
    from tf_bus.models.classifier import LesionAttentionPool

    f = np.array([[[[1.0, 10.0], [2.0, 20.0]], [[3.0, 30.0], [4.0, 40.0]]]], np.float32)  # (1, 2, 2, 2)
    logits = np.array([0.0, 3.0, -2.0, -50.0], np.float32).reshape(1, 2, 2, 1)
    p = 1 / (1 + np.exp(-logits.reshape(-1)))
    feats = f.reshape(4, 2)
    layer = LesionAttentionPool(smooth=1.0)
    out = np.asarray(layer(f, logits))
    want = np.concatenate([(feats * p[:, None]).sum(0) / (p.sum() + 1.0), [p.max()]])
    np.testing.assert_allclose(out[0], want, rtol=1e-5)
    # No lesion anywhere: the pooled features fade to 0 and the presence is 0.
    np.testing.assert_allclose(np.asarray(layer(f, np.full((1, 2, 2, 1), -50.0, np.float32))), 0.0, atol=1e-6)
    assert LesionAttentionPool.from_config(layer.get_config()).smooth == 1.0


def test_lesion_pooling_classifier_keeps_the_lesion_head_when_served(tmp_path):
    from tf_bus.models.classifier import inference_model

    model = build_classifier(TEST_BACKBONE, None, image_size=(64, 64), channels=1, mask_loss_weight=1.0,
                             lesion_pooling=True)
    assert model.get_layer("pool_concat").output.shape == (None, 2048 + 1024 + 1)
    clf = inference_model(model)
    assert clf.input_shape == (None, 64, 64, 1) and clf.output_shape == (None, 3)
    assert {"lesion_logits", "lesion_pool"} <= {l.name for l in clf.layers}
    x = np.random.default_rng(1).random((2, 64, 64, 1), np.float32) * 255
    clf.save(tmp_path / "clf.keras")
    again = keras.saving.load_model(tmp_path / "clf.keras")
    np.testing.assert_allclose(again.predict(x, verbose=0), clf.predict(x, verbose=0), atol=1e-6)
