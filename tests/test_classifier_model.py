"""The ResNet classifier: both backbones, each weights option, freezing, the offline error."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tf_bus.data.busi import TfBusError
from tf_bus.models import classifier as clf
from tf_bus.models.classifier import ResNetPreprocess, build_classifier, resolve_weights, set_trainable_stages


@pytest.mark.parametrize("backbone", ["resnet50", "resnet101"])
@pytest.mark.parametrize("channels", [1, 3])
def test_builds_and_outputs_probabilities(backbone, channels):
    model = build_classifier(backbone, None, image_size=(64, 64), channels=channels)
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, channels)).astype("float32")
    p = model.predict(x, verbose=0)
    assert p.shape == (2, 3) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert model.get_layer("backbone").name == "backbone"


def test_local_weights_file_is_loaded(tmp_path):
    source = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3))
    path = tmp_path / "resnet50_notop.weights.h5"
    source.save_weights(path)
    model = build_classifier("resnet50", str(path), image_size=(64, 64))
    got = model.get_layer("backbone").get_layer("conv1_conv").get_weights()[0]
    np.testing.assert_array_equal(got, source.get_layer("conv1_conv").get_weights()[0])


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
