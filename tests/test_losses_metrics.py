"""Losses and mask metrics against values worked out by hand on 2x2 masks."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from tf_bus.models.losses import BceDiceLoss, FocalTverskyLoss, SoftDiceLoss, get_loss
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
]


@pytest.mark.parametrize("loss,y_true,y_pred,expected", LOSS_CASES)
def test_losses_by_hand(loss, y_true, y_pred, expected):
    assert float(loss(y_true, y_pred)) == pytest.approx(expected, abs=1e-5)


def test_losses_are_per_image_means():
    y_true = np.concatenate([G, Z])
    y_pred = np.concatenate([P, Z])
    assert float(SoftDiceLoss()(y_true, y_pred)) == pytest.approx((1 - 2.6 / 3 + 0.0) / 2, abs=1e-6)


@pytest.mark.parametrize("cls", [SoftDiceLoss, BceDiceLoss, FocalTverskyLoss])
def test_loss_config_round_trip(cls):
    loss = cls()
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(again) is cls and again.get_config() == loss.get_config()


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
