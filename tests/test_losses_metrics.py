"""Losses and mask metrics against values worked out by hand on 2x2 masks."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from tf_bus.config import SEGMENTATION_LOSSES, SegmenterConfig
from tf_bus.models.losses import BceDiceLoss, BoundaryBceDiceLoss, FocalTverskyLoss, SoftDiceLoss, get_loss
from tf_bus.models.metrics import DiceScore, IoUScore


def _m(rows):
    return np.asarray(rows, np.float32).reshape(1, 2, 2, 1)


G = _m([[1, 0], [0, 0]])
P = _m([[0.8, 0.2], [0.0, 0.0]])
Z = _m([[0, 0], [0, 0]])
BCE_GP = (-math.log(0.8) * 2) / 4  # two pixels at 0.8 confidence, two exact zeros

LOSS_CASES = [
    # tp=0.8, sum p=1, sum g=1: (2*0.8+1)/(2+1)
    (SoftDiceLoss(), G, P, 1 - 2.6 / 3),
    (SoftDiceLoss(smooth=0.0), G, P, 1 - 1.6 / 2),
    (SoftDiceLoss(), Z, Z, 0.0),  # empty truth, empty prediction: perfect
    (SoftDiceLoss(), Z, _m([[1, 0], [0, 0]]), 1 - 1 / 2),
    # tp=.8, fn=.2, fp=.2: TI=(.8+1)/(.8+.7*.2+.3*.2+1)=0.9; (1-0.9)**0.75
    (FocalTverskyLoss(), G, P, 0.1 ** 0.75),
    (FocalTverskyLoss(gamma=1.0), G, P, 0.1),
    (FocalTverskyLoss(), Z, Z, 0.0),
    (BceDiceLoss(), G, P, BCE_GP + 1 - 2.6 / 3),
    (get_loss("bce"), G, P, BCE_GP),
    # On a 2x2 image every pixel lies within 1 px of the outline: a uniform weight, plain bce_dice.
    (BoundaryBceDiceLoss(band_radius=1), G, P, BCE_GP + 1 - 2.6 / 3),
]

# A 1x5 strip: truth 1 1 1 0 0. Dilation by 3 px: 1 1 1 1 0, erosion: 1 1 0 0 0 (the image
# border is no outline), so the band is 0 0 1 1 0 and its pixels weigh 1 + 4.
STRIP = np.asarray([1, 1, 1, 0, 0], np.float32).reshape(1, 1, 5, 1)
STRIP_P = np.asarray([0.9, 0.9, 0.6, 0.4, 0.1], np.float32).reshape(1, 1, 5, 1)
STRIP_BCE = [-math.log(0.9), -math.log(0.9), -math.log(0.6), -math.log(0.6), -math.log(0.9)]
STRIP_DICE = 1 - (2 * 2.4 + 1) / (2.9 + 3 + 1)  # tp 0.9+0.9+0.6, sum p 2.9, sum g 3


@pytest.mark.parametrize("band_weight,weights", [(4.0, [1, 1, 5, 5, 1]), (0.0, [1, 1, 1, 1, 1]),
                                                 (9.0, [1, 1, 10, 10, 1])])
def test_boundary_loss_by_hand(band_weight, weights):
    loss = BoundaryBceDiceLoss(band_radius=1, band_weight=band_weight)
    expected = sum(w * b for w, b in zip(weights, STRIP_BCE)) / sum(weights) + STRIP_DICE
    assert float(loss(STRIP, STRIP_P)) == pytest.approx(expected, abs=1e-5)


def test_boundary_band_is_the_outline_only():
    square = np.zeros((1, 8, 8, 1), np.float32)
    square[0, 2:6, 2:6, 0] = 1
    band = np.asarray(BoundaryBceDiceLoss(band_radius=1).band(square))[0, :, :, 0]
    expected = np.zeros((8, 8))
    expected[1:7, 1:7] = 1
    expected[3:5, 3:5] = 0  # the core, 2 px from the outline
    np.testing.assert_array_equal(band, expected)
    for flat in (np.zeros_like(square), np.ones_like(square)):  # no outline: no band
        assert not np.asarray(BoundaryBceDiceLoss().band(flat)).any()


def test_boundary_loss_without_weight_is_bce_dice():
    rng = np.random.default_rng(0)
    y_true = (rng.random((3, 16, 16, 1)) > 0.6).astype(np.float32)
    y_pred = rng.uniform(0.01, 0.99, (3, 16, 16, 1)).astype(np.float32)
    assert float(BoundaryBceDiceLoss(band_weight=0.0)(y_true, y_pred)) == pytest.approx(
        float(BceDiceLoss()(y_true, y_pred)), abs=1e-5)
    # Weighting the outline raises the loss where the errors sit on it.
    assert float(BoundaryBceDiceLoss()(STRIP, STRIP_P)) > float(BceDiceLoss()(STRIP, STRIP_P))


@pytest.mark.parametrize("kwargs,message", [(dict(band_radius=0), "band_radius"), (dict(band_radius=1.5), "band_radius"),
                                            (dict(band_weight=-1.0), "band_weight")])
def test_boundary_loss_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BoundaryBceDiceLoss(**kwargs)


@pytest.mark.parametrize("loss,y_true,y_pred,expected", LOSS_CASES)
def test_losses_by_hand(loss, y_true, y_pred, expected):
    assert float(loss(y_true, y_pred)) == pytest.approx(expected, abs=1e-5)


def test_losses_are_per_image_means():
    y_true = np.concatenate([G, Z])
    y_pred = np.concatenate([P, Z])
    assert float(SoftDiceLoss()(y_true, y_pred)) == pytest.approx((1 - 2.6 / 3 + 0.0) / 2, abs=1e-6)


@pytest.mark.parametrize("cls", [SoftDiceLoss, BceDiceLoss, FocalTverskyLoss, BoundaryBceDiceLoss])
def test_loss_config_round_trip(cls):
    loss = cls()
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(again) is cls and again.get_config() == loss.get_config()


@pytest.mark.parametrize("name", SEGMENTATION_LOSSES)
def test_every_configurable_loss_builds(name):
    assert SegmenterConfig(loss=name).loss == name
    loss = get_loss(name)
    assert isinstance(loss, keras.losses.Loss)
    assert 0.0 <= float(loss(G, P)) < 2.0


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="Received: loss='dicee'"):
        get_loss("dicee")


T = _m([[1, 1], [0, 0]])
PRED = _m([[0.9, 0.4], [0.6, 0.1]])  # at 0.5: A={(0,0),(1,0)}, G={(0,0),(0,1)}, |A∩G|=1

METRIC_CASES = [
    (DiceScore(), [T], [PRED], 2 * 1 / (2 + 2)),
    (IoUScore(), [T], [PRED], 1 / 3),
    (DiceScore(threshold=0.35), [T], [PRED], 2 * 2 / (2 + 3)),  # A gains (0,1): |A|=3, inter 2
    (IoUScore(threshold=0.35), [T], [PRED], 2 / 3),
    (DiceScore(), [Z], [Z], 1.0),  # empty truth, empty prediction
    (IoUScore(), [Z], [Z], 1.0),
    (DiceScore(), [Z], [PRED], 0.0),  # empty truth, something predicted
    (IoUScore(), [T], [Z], 0.0),  # lesion missed entirely
    (DiceScore(), [T, Z], [PRED, Z], (0.5 + 1.0) / 2),  # mean over images, over two updates
]


@pytest.mark.parametrize("metric,trues,preds,expected", METRIC_CASES)
def test_metrics_by_hand(metric, trues, preds, expected):
    for t, p in zip(trues, preds):
        metric.update_state(t, p)
    assert float(metric.result()) == pytest.approx(expected, abs=1e-6)
    metric.reset_state()
    assert float(metric.result()) == 0.0
