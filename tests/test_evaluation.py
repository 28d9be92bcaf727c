"""Mask metrics against hand-made masks, including every empty case."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tf_bus.evaluation import (aggregate_mask_metrics, choose_postprocessing, choose_threshold, hd95, mask_metrics,
                               postprocess_mask)


def _a(rows):
    return np.asarray(rows, bool)


NAN = math.nan
CASES = [
    # (prediction, truth, expected tpr, fpr, jaccard, dice, precision)
    ("half overlap", _a([[1, 0], [1, 0]]), _a([[1, 1], [0, 0]]), (0.5, 0.5, 1 / 3, 0.5, 0.5)),
    ("exact", _a([[1, 1], [0, 0]]), _a([[1, 1], [0, 0]]), (1.0, 0.0, 1.0, 1.0, 1.0)),
    ("over-segmented", _a([[1, 1], [1, 1]]), _a([[1, 0], [0, 0]]), (1.0, 3.0, 0.25, 0.4, 0.25)),
    ("missed lesion", _a([[0, 0], [0, 0]]), _a([[0, 1], [0, 0]]), (0.0, 0.0, 0.0, 0.0, 0.0)),
    ("disjoint", _a([[0, 0], [0, 1]]), _a([[1, 0], [0, 0]]), (0.0, 1.0, 0.0, 0.0, 0.0)),
    ("normal, empty prediction", _a([[0, 0], [0, 0]]), _a([[0, 0], [0, 0]]), (NAN,) * 5),
    ("normal, false positive", _a([[1, 0], [0, 0]]), _a([[0, 0], [0, 0]]), (NAN,) * 5),
]


@pytest.mark.parametrize("name,pred,truth,expected", CASES, ids=[c[0] for c in CASES])
def test_mask_metrics_by_hand(name, pred, truth, expected):
    m = mask_metrics(pred, truth)
    for key, want in zip(("tpr", "fpr", "jaccard", "dice", "precision"), expected):
        if math.isnan(want):
            assert math.isnan(m[key]), key
        else:
            assert m[key] == pytest.approx(want), key
    assert m["lesion"] == bool(truth.any())
    assert m["predicted_empty"] == (not pred.any())
    assert m["fp_area_fraction"] == pytest.approx(np.count_nonzero(pred & ~truth) / 4)


def test_jaccard_never_exceeds_tpr_nor_dice():
    rng = np.random.default_rng(0)
    for _ in range(200):
        g = rng.random((8, 8)) < rng.random()
        a = rng.random((8, 8)) < rng.random()
        if not g.any():
            continue
        m = mask_metrics(a, g, with_hd95=False)
        assert m["jaccard"] <= m["tpr"] + 1e-12 and m["jaccard"] <= m["dice"] + 1e-12


HD_CASES = [
    (_a([[1, 0, 0, 0]]), _a([[0, 0, 0, 1]]), 3.0),
    (_a([[1, 1], [1, 1]]), _a([[1, 1], [1, 1]]), 0.0),
    (_a([[0, 0], [0, 0]]), _a([[1, 0], [0, 0]]), NAN),
]


@pytest.mark.parametrize("pred,truth,expected", HD_CASES)
def test_hd95_by_hand(pred, truth, expected):
    got = hd95(pred, truth)
    assert math.isnan(got) if math.isnan(expected) else got == pytest.approx(expected)


def test_aggregate_reports_lesion_and_normal_images_apart():
    rows = [mask_metrics(*c[1:3]) for c in CASES]
    agg = aggregate_mask_metrics(rows)
    assert agg["lesion_images"]["n"] == 5 and agg["normal_images"]["n"] == 2
    assert agg["lesion_images"]["dice"]["mean"] == pytest.approx((0.5 + 1 + 0.4 + 0 + 0) / 5)
    assert agg["normal_images"]["share_predicted_empty"] == 0.5
    assert agg["lesion_images"]["hd95_undefined"] == 1  # the missed lesion
    # Dice 0.4, 0 and 0 are under 0.5; the missed and the disjoint lesion have no overlap;
    # only the missed one has an empty prediction.
    assert agg["lesion_images"]["failures"] == {"dice_below_0.5": 3, "no_overlap": 2, "predicted_empty": 1}


def test_choose_threshold_picks_the_best_dice():
    truth = np.zeros((4, 4), np.uint8)
    truth[:2, :2] = 1
    prob = np.where(truth > 0, 0.4, 0.1).astype(np.float32)  # right shape, low confidence
    best, scores = choose_threshold([("a", "", prob, truth)])
    assert best <= 0.4 and scores[best] == pytest.approx(1.0)
    assert scores[0.5] == 0.0


def _mask(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in r] for r in rows])


@pytest.mark.parametrize("mode, given, expected", [
    ("none", ["##..#", "##...", "....."], ["##..#", "##...", "....."]),
    ("largest", ["##..#", "##...", "....."], ["##...", "##...", "....."]),  # the stray pixel goes
    ("largest", ["###..", "#.#..", "###.#"], ["###..", "###..", "###.."]),  # the hole is filled
    ("largest", ["#....", ".#...", "..#.#"], ["#....", ".#...", "..#.."]),  # 8-connected: a diagonal is one
    ("largest", [".....", "....."], [".....", "....."]),  # empty stays empty
])
def test_postprocessing_by_hand(mode, given, expected):
    assert np.array_equal(postprocess_mask(_mask(given), mode), _mask(expected))
    if mode == "largest":  # what an exported segmenter applies in its signature
        from tf_bus.descriptors import largest_component_tf

        np.testing.assert_array_equal(largest_component_tf(_mask(given)).numpy(), _mask(expected))


def _noisy(seed, shape=(60, 80)):
    from scipy import ndimage

    p = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 1.5)
    return p > np.quantile(p, 0.6)


@pytest.mark.parametrize("mask", [
    _noisy(0), _noisy(1, (33, 97)), _noisy(2, (97, 33)), _noisy(3, (240, 280)),  # the last: a labyrinth
    _mask(["#.#.#", ".....", "#.#.#"]),  # five single pixels tie: the first wins
    _mask(["#####", "#...#", "#.#.#", "#...#", "#####"]),  # a ring around an island: all filled
], ids=["noise0", "noise1", "noise2", "labyrinth", "ties", "island"])
def test_tensorflow_largest_component_equals_scipys(mask):
    from tf_bus.descriptors import largest_component_tf

    np.testing.assert_array_equal(largest_component_tf(mask).numpy(), postprocess_mask(mask, "largest"))


def test_postprocessing_is_chosen_on_validation_only_when_it_helps():
    truth = np.zeros((8, 8), np.uint8)
    truth[1:5, 1:5] = 1
    prob = np.where(truth > 0, 0.9, 0.1).astype(np.float32)
    clean = [("a", "", prob, truth)]
    t, mode, scores = choose_postprocessing(clean)
    assert mode == "none" and scores["none"][t] == pytest.approx(1.0)  # a tie keeps the mask as it is
    noisy = prob.copy()
    noisy[6:8, 6:8] = 0.9  # a false blob apart from the lesion
    t, mode, scores = choose_postprocessing([("a", "", noisy, truth)])
    assert mode == "largest" and scores["largest"][t] == pytest.approx(1.0)
    assert scores["none"][t] < 0.9
    with pytest.raises(ValueError, match="largest"):
        postprocess_mask(truth, "biggest")


def test_classification_metrics_by_hand():
    from tf_bus.evaluation import classification_metrics

    y = [0, 0, 1, 1, 2, 2]
    # predictions: 0,1 | 1,1 | 2,0  -> confusion [[1,1,0],[0,2,0],[1,0,1]]
    prob = np.array([[.8, .1, .1], [.3, .6, .1], [.1, .8, .1], [.2, .7, .1], [.1, .1, .8], [.5, .2, .3]])
    m = classification_metrics(y, prob)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    pc = m["per_class"]
    assert pc["benign"]["precision"] == pytest.approx(0.5) and pc["benign"]["recall"] == pytest.approx(0.5)
    assert pc["malignant"]["precision"] == pytest.approx(2 / 3) and pc["malignant"]["recall"] == pytest.approx(1.0)
    assert pc["normal"]["precision"] == pytest.approx(1.0) and pc["normal"]["recall"] == pytest.approx(0.5)
    f1 = [0.5, 0.8, 2 / 3]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    # normal vs rest scores: positives .8, .3; negatives .1 .1 .1 .1 -> every positive ranks above: AUC 1
    assert pc["normal"]["roc_auc_ovr"] == pytest.approx(1.0)


@pytest.mark.parametrize("y, prob, brier, log_loss, ece, bins", [
    # two right answers at 0.85 and 0.65: bins (0.8, 0.9] and (0.6, 0.7], each off by its gap
    ([0, 1], [[.85, .1, .05], [.2, .65, .15]],
     ((.15**2 + .1**2 + .05**2) + (.2**2 + .35**2 + .15**2)) / 2, -(np.log(.85) + np.log(.65)) / 2,
     (0.15 + 0.35) / 2, [(0.6, 0.7, 1, 1.0, 0.65), (0.8, 0.9, 1, 1.0, 0.85)]),
    # ten images at 0.75, three of them wrong: bin (0.7, 0.8] holds accuracy 0.7 at 0.75
    ([0] * 7 + [1] * 3, [[.75, .2, .05]] * 10,
     (7 * (.25**2 + .2**2 + .05**2) + 3 * (.75**2 + .8**2 + .05**2)) / 10,
     -(7 * np.log(.75) + 3 * np.log(.2)) / 10, 0.05, [(0.7, 0.8, 10, 0.7, 0.75)]),
    # a confident wrong answer: ECE 1 - 0 at the top bin; log loss of the clipped 0
    ([2], [[1.0, 0.0, 0.0]], 2.0, -np.log(1e-15), 1.0, [(0.9, 1.0, 1, 0.0, 1.0)]),
])
def test_calibration_metrics_by_hand(y, prob, brier, log_loss, ece, bins):
    from tf_bus.evaluation import calibration_metrics, classification_metrics

    cal = calibration_metrics(y, np.array(prob))
    assert cal["brier"] == pytest.approx(brier)
    assert cal["log_loss"] == pytest.approx(log_loss)
    assert cal["ece"] == pytest.approx(ece)
    assert [(b["lower"], b["upper"], b["count"], b["accuracy"], b["confidence"]) for b in cal["bins"]] == \
        [pytest.approx(b) for b in bins]
    assert classification_metrics(y, np.array(prob))["calibration"] == cal


def test_calibration_of_uniform_answers():
    from tf_bus.evaluation import calibration_metrics

    cal = calibration_metrics([0, 1, 2], np.full((3, 3), 1 / 3))
    # Brier 2/3 (the docstring's uninformed answer); ties go to class 0, right once in three
    assert cal["brier"] == pytest.approx(2 / 3) and cal["ece"] == pytest.approx(0.0)
    assert cal["bins"] == [pytest.approx({"lower": 0.3, "upper": 0.4, "count": 3, "accuracy": 1 / 3,
                                          "confidence": 1 / 3})]


def test_auc_of_an_absent_class_is_none():
    from tf_bus.evaluation import classification_metrics

    m = classification_metrics([0, 1], np.array([[.9, .05, .05], [.2, .7, .1]]))
    assert m["per_class"]["normal"]["roc_auc_ovr"] is None and m["macro_roc_auc_ovr"] == pytest.approx(1.0)
