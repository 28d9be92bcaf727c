"""Weight averaging (`--ema`): validation, checkpoints and the final model use the averages,
whether the run finishes all its epochs or stops early."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from conftest import TEST_BACKBONE
from tf_bus.config import ClassifierConfig, ConfigError, SegmenterConfig
from tf_bus.training.callbacks import EMAWeights
from tf_bus.training.common import make_optimizer

MOMENTUM = 0.8


class _StopAfter(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.model.stop_training = True


class _Record(keras.callbacks.Callback):
    """The raw weights after every step, and what the callbacks after EMAWeights see at epoch end."""

    def __init__(self):
        super().__init__()
        self.steps, self.epoch_end = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append([w.copy() for w in self.model.get_weights()])

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_end.append([w.copy() for w in self.model.get_weights()])


def _ema(steps):
    """Keras' rule: the average starts at the weights after the first step."""
    avg = [w.copy() for w in steps[0]]
    for ws in steps[1:]:
        avg = [MOMENTUM * a + (1 - MOMENTUM) * w for a, w in zip(avg, ws)]
    return avg


def _model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(keras.layers.Dense(5, activation="tanh")(inputs)))
    model.compile(make_optimizer(0.05, "constant", 0, 3, 4, 1e-4, ema=MOMENTUM), "mse")
    return model


@pytest.mark.parametrize("stop_after", [None, 0, 1], ids=["all_epochs", "stopped_after_1", "stopped_after_2"])
def test_validation_checkpoints_and_final_weights_are_the_averages(stop_after):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)).astype("float32"), rng.normal(size=(32, 1)).astype("float32")
    xv, yv = rng.normal(size=(16, 4)).astype("float32"), rng.normal(size=(16, 1)).astype("float32")
    model = _model()
    record = _Record()
    stoppers = [] if stop_after is None else [_StopAfter(stop_after)]
    history = model.fit(x, y, batch_size=8, epochs=3, validation_data=(xv, yv), verbose=0, shuffle=False,
                        callbacks=[*stoppers, EMAWeights(), record])
    epochs = 3 if stop_after is None else stop_after + 1
    assert len(record.epoch_end) == len(history.history["loss"]) == epochs
    steps_per_epoch = len(record.steps) // epochs
    probe = _model()
    for e in range(epochs):
        expected = _ema(record.steps[:(e + 1) * steps_per_epoch])
        for got, want in zip(record.epoch_end[e], expected):  # what BestCheckpoint would save
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        probe.set_weights(expected)  # validation ran on the averages
        np.testing.assert_allclose(history.history["val_loss"][e], probe.evaluate(xv, yv, verbose=0), rtol=1e-5)
    for got, want, raw in zip(model.get_weights(), _ema(record.steps), record.steps[-1]):  # the model fit leaves
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, raw), "the averages differ from the last raw weights"


@pytest.mark.slow
def test_segmenter_run_stopped_by_its_budget_ends_on_the_averages(prepared, tmp_path):
    """The time budget stops the run after its first epoch: last.keras must then hold the
    averaged weights that validation picked best.keras with, not the raw ones."""
    from tf_bus.training.segmentation import train_segmenter

    run = tmp_path / "run"
    config = SegmenterConfig(image_size=(32, 32), depth=2, base_filters=4, batch_size=8, epochs=3, warmup_epochs=0,
                             ema=0.9, time_budget_minutes=1e-4, diagnostics=False)
    summary = train_segmenter(prepared, run, config, verbose=0)
    assert summary["stopped_by_time_budget"] and summary["epochs_run_in_this_fit"] == 1
    best = keras.saving.load_model(run / "best.keras").get_weights()
    last = keras.saving.load_model(run / "last.keras").get_weights()
    assert len(best) == len(last)
    for b, l in zip(best, last):
        np.testing.assert_array_equal(b, l)


@pytest.mark.parametrize("cls", [SegmenterConfig, ClassifierConfig])
@pytest.mark.parametrize("ema", [-0.1, 1.0, 1.5])
def test_bad_momentum_is_refused(cls, ema):
    with pytest.raises(ConfigError, match=f"Received: ema={ema}"):
        cls(ema=ema)


@pytest.mark.slow
def test_classifier_run_stopped_by_its_budget_ends_on_the_averages(prepared, tmp_path):
    """As for the U-Net: the saved classifiers (best.keras by validation, last.keras at the
    end) are the same averaged weights when the budget stops the run after one epoch."""
    from tf_bus.training.classification import train_classifier

    run = tmp_path / "run"
    config = ClassifierConfig(backbone=TEST_BACKBONE, image_size=(32, 32), batch_size=8, epochs=2, warmup_epochs=0,
                              ema=0.9, time_budget_minutes=1e-4, diagnostics=False)
    summary = train_classifier(prepared, run, config, verbose=0)
    assert summary["stopped_by_time_budget"] and summary["epochs_run_in_this_fit"] == 1
    best = keras.saving.load_model(run / "best.keras").get_weights()
    last = keras.saving.load_model(run / "last.keras").get_weights()
    assert len(best) == len(last) > 100
    for b, l in zip(best, last):
        np.testing.assert_array_equal(b, l)
