"""`tf-bus compare`: paired comparison of two evaluations, against hand-made per-case results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import f1_score

from tf_bus.comparison import _f1_per_class, bootstrap_interval, compare, load_results, plot_comparison, to_json
from tf_bus.data.busi import TfBusError


def seg_row(name, dice, tpr, *, lesion=True, empty=False):
    if not lesion:
        return {"name": name, "lesion": False, "predicted_empty": empty, "dice": None, "jaccard": None, "tpr": None,
                "fpr": None, "precision": None, "hd95": None}
    return {"name": name, "lesion": True, "predicted_empty": False, "dice": dice, "jaccard": dice / (2 - dice),
            "tpr": tpr, "fpr": 0.1, "precision": 0.8, "hd95": 3.0}


def write(path, rows, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"per_image": rows, **extra}))
    return path


# (name, dice A, tpr A, dice B, tpr B): B gains on two images, loses on one.
SEG = [("benign (1)", 0.90, 0.95, 0.92, 0.95), ("benign (2)", 0.00, 0.00, 0.80, 0.85),
       ("malignant (1)", 0.40, 0.10, 0.45, 0.50), ("malignant (2)", 0.85, 0.90, 0.03, 0.01)]


@pytest.fixture
def seg_pair(tmp_path):
    normals_a = [seg_row("normal (1)", None, None, lesion=False, empty=True),
                 seg_row("normal (2)", None, None, lesion=False, empty=False)]
    normals_b = [seg_row("normal (1)", None, None, lesion=False, empty=False),
                 seg_row("normal (2)", None, None, lesion=False, empty=False)]
    a = write(tmp_path / "a" / "cross_validation.json", [seg_row(n, da, ta) for n, da, ta, _, _ in SEG] + normals_a)
    b = write(tmp_path / "b" / "eval_test" / "metrics.json", [seg_row(n, db, tb) for n, _, _, db, tb in SEG] + normals_b)
    return a, b


def test_segmenters_are_compared_image_by_image(seg_pair):
    a, b = seg_pair
    r = compare(a.parent, b.parent.parent, resamples=2000)  # a CV folder and a run folder
    assert r["kind"] == "segmenter" and r["shared_cases"] == 6 and r["only_in_a"] == r["only_in_b"] == 0
    les = r["lesion_images"]
    dice = les["metrics"]["dice"]
    da, db = np.array([s[1] for s in SEG]), np.array([s[3] for s in SEG])
    assert les["n"] == 4 and dice["a"] == pytest.approx(da.mean()) and dice["b"] == pytest.approx(db.mean())
    assert dice["difference"] == pytest.approx((db - da).mean())
    assert dice["ci95"][0] <= dice["difference"] <= dice["ci95"][1]
    assert dice["ci95"][0] >= (db - da).min() and dice["ci95"][1] <= (db - da).max()
    assert dice["median_a"] == pytest.approx(np.median(da))
    assert les["dice_better"] == {"a": 1, "b": 3, "tie": 0}
    assert les["failures"]["a"] == {"dice_below_0.5": 2, "dice_below_0.05": 1, "wrong_place": 2}
    assert les["failures"]["b"] == {"dice_below_0.5": 2, "dice_below_0.05": 1, "wrong_place": 1}
    assert r["normal_images"] == {"n": 2, "predicted_empty": {"a": 1, "b": 0}, "empty_in_a_only": 1,
                                  "empty_in_b_only": 0}
    json.dumps(to_json(r))  # serialisable once the plot's arrays are dropped


def test_one_result_against_itself_differs_by_exactly_zero(seg_pair):
    a, _ = seg_pair
    r = compare(a, a, resamples=500)
    for m in r["lesion_images"]["metrics"].values():
        assert m["difference"] == 0 and m["ci95"] == [0.0, 0.0]


def test_a_constant_difference_has_a_zero_width_interval(tmp_path):
    a = write(tmp_path / "a.json", [seg_row(f"benign ({i})", 0.5, 0.6) for i in range(30)])
    b = write(tmp_path / "b.json", [seg_row(f"benign ({i})", 0.7, 0.6) for i in range(30)])
    dice = compare(a, b, resamples=500)["lesion_images"]["metrics"]["dice"]
    assert dice["difference"] == pytest.approx(0.2) and dice["ci95"] == pytest.approx([0.2, 0.2])


def test_only_the_shared_cases_are_paired_and_the_rest_counted(tmp_path):
    a = write(tmp_path / "a.json", [seg_row(f"benign ({i})", 0.5, 0.6) for i in range(10)])
    b = write(tmp_path / "b.json", [seg_row(f"benign ({i})", 0.6, 0.6) for i in range(5, 12)])
    r = compare(a, b, resamples=500)
    assert (r["shared_cases"], r["only_in_a"], r["only_in_b"]) == (5, 5, 2)
    assert r["lesion_images"]["n"] == 5


def test_cross_validations_with_the_same_folds_are_also_compared_fold_by_fold(tmp_path):
    folds = [0, 0, 1, 1]
    a = write(tmp_path / "a.json", [{**seg_row(n, da, ta), "fold": f} for (n, da, ta, _, _), f in zip(SEG, folds)]
              + [{**seg_row("normal (1)", None, None, lesion=False), "fold": 1}])
    b = write(tmp_path / "b.json", [{**seg_row(n, db, tb), "fold": f} for (n, _, _, db, tb), f in zip(SEG, folds)]
              + [{**seg_row("normal (1)", None, None, lesion=False), "fold": 1}])
    r = compare(a, b, resamples=200)
    assert [(f["fold"], f["n"]) for f in r["folds"]] == [(0, 2), (1, 2)]  # lesion images only
    assert r["folds"][0]["a"] == pytest.approx((0.90 + 0.00) / 2) and r["folds"][1]["b"] == pytest.approx((0.45 + 0.03) / 2)
    assert r["folds"][1]["difference"] == pytest.approx(((0.45 - 0.40) + (0.03 - 0.85)) / 2)
    # Other fold assignments (another split): no per-fold comparison.
    c = write(tmp_path / "c.json", [{**seg_row(n, db, tb), "fold": 1 - f} for (n, _, _, db, tb), f in zip(SEG, folds)]
              + [{**seg_row("normal (1)", None, None, lesion=False), "fold": 1}])
    assert compare(a, c, resamples=200)["folds"] is None


LABELS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 1]
PRED_A = [0, 0, 1, 0, 1, 0, 1, 2, 0, 2, 0, 1]
PRED_B = [0, 0, 0, 2, 1, 1, 0, 2, 2, 1, 1, 1]


def cls_rows(predicted):
    return [{"name": f"case ({i})", "label": y, "probabilities": list(np.eye(3)[p] * 0.7 + 0.1)}
            for i, (y, p) in enumerate(zip(LABELS, predicted))]


def test_classifiers_are_compared_case_by_case(tmp_path):
    from scipy.stats import binomtest

    a = write(tmp_path / "a.json", cls_rows(PRED_A))
    b = write(tmp_path / "b.json", cls_rows(PRED_B))
    r = compare(a, b, resamples=2000)
    assert r["kind"] == "classifier" and r["n"] == 12
    acc_a, acc_b = np.mean(np.equal(LABELS, PRED_A)), np.mean(np.equal(LABELS, PRED_B))
    assert r["accuracy"]["a"] == pytest.approx(acc_a) and r["accuracy"]["b"] == pytest.approx(acc_b)
    assert r["accuracy"]["difference"] == pytest.approx(acc_b - acc_a)
    f1a, f1b = f1_score(LABELS, PRED_A, average="macro"), f1_score(LABELS, PRED_B, average="macro")
    assert r["macro_f1"]["a"] == pytest.approx(f1a) and r["macro_f1"]["b"] == pytest.approx(f1b)
    assert r["macro_f1"]["ci95"][0] <= f1b - f1a <= r["macro_f1"]["ci95"][1]
    per_class = f1_score(LABELS, PRED_A, average=None)
    assert [r["per_class_f1"][c]["a"] for c in ("benign", "malignant", "normal")] == pytest.approx(per_class)
    assert r["per_class_f1"]["benign"]["n"] == 5
    right_a, right_b = np.equal(LABELS, PRED_A), np.equal(LABELS, PRED_B)
    only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    assert (r["right_in_a_only"], r["right_in_b_only"]) == (only_a, only_b) == (4, 3)
    assert r["mcnemar_exact_p"] == pytest.approx(binomtest(4, 7, 0.5).pvalue)
    assert r["folds"] is None, "one split, no folds"
    in_folds = [{**row, "fold": i % 2} for i, row in enumerate(cls_rows(PRED_A))]
    r = compare(write(tmp_path / "fa.json", in_folds),
                write(tmp_path / "fb.json", [{**row, "fold": i % 2} for i, row in enumerate(cls_rows(PRED_B))]),
                resamples=200)
    assert [f["a"] for f in r["folds"]] == pytest.approx([right_a[0::2].mean(), right_a[1::2].mean()])
    assert [f["b"] for f in r["folds"]] == pytest.approx([right_b[0::2].mean(), right_b[1::2].mean()])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_macro_f1_matches_sklearn_on_resamples(seed):
    rng = np.random.default_rng(seed)
    labels, predicted = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
    idx = rng.integers(0, 40, (25, 40))
    ours = _f1_per_class(labels[idx], predicted[idx], 3).mean(axis=0)
    theirs = [f1_score(labels[i], predicted[i], average="macro", labels=[0, 1, 2], zero_division=0) for i in idx]
    np.testing.assert_allclose(ours, theirs)


def test_bootstrap_interval_is_reproducible_and_covers_the_mean():
    x = np.random.default_rng(3).normal(0.3, 1.0, 200)
    one = bootstrap_interval(lambda idx: x[idx].mean(axis=1), 200, resamples=3000, seed=7)
    assert one == bootstrap_interval(lambda idx: x[idx].mean(axis=1), 200, resamples=3000, seed=7)
    assert one[0] < x.mean() < one[1] and one[1] - one[0] == pytest.approx(2 * 1.96 / np.sqrt(200), rel=0.2)


def test_plots_are_pngs(seg_pair, tmp_path):
    a, b = seg_pair
    plot_comparison(compare(a, b, resamples=200), tmp_path / "seg.png")
    c = write(tmp_path / "c.json", cls_rows(PRED_A))
    d = write(tmp_path / "d.json", cls_rows(PRED_B))
    plot_comparison(compare(c, d, resamples=200), tmp_path / "cls.png", ("A", "B"))
    for name in ("seg.png", "cls.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def _bad_inputs(tmp_path):
    seg = write(tmp_path / "seg.json", [seg_row("benign (1)", 0.5, 0.5)])
    cls = write(tmp_path / "cls.json", cls_rows(PRED_A))
    (tmp_path / "text.json").write_text("not json")
    write(tmp_path / "dup.json", [seg_row("benign (1)", 0.5, 0.5)] * 2)
    (tmp_path / "nolist.json").write_text(json.dumps({"aggregate": {}}))
    write(tmp_path / "other.json", [seg_row("benign (9)", 0.5, 0.5)])
    write(tmp_path / "normal.json", [seg_row("benign (1)", None, None, lesion=False)])
    relabelled = cls_rows(PRED_A)
    relabelled[0]["label"] = 2
    write(tmp_path / "relabelled.json", relabelled)
    (tmp_path / "empty_run").mkdir()
    return seg, cls


BAD = [
    ("missing", "seg.json", "no such file or folder"),
    ("empty_run", "seg.json", "holds neither cross_validation.json nor eval_test/metrics.json"),
    ("text.json", "seg.json", "not JSON"),
    ("nolist.json", "seg.json", "has no per_image list"),
    ("dup.json", "seg.json", "appears twice"),
    ("seg.json", "cls.json", "compare like with like"),
    ("seg.json", "other.json", "share no case name"),
    ("seg.json", "normal.json", "lesion images in one result and normal in the other"),
    ("cls.json", "relabelled.json", "different labels"),
]


@pytest.mark.parametrize("a,b,message", BAD)
def test_bad_inputs_name_the_file_and_the_fix(a, b, message, tmp_path):
    _bad_inputs(tmp_path)
    with pytest.raises(TfBusError, match=message):
        compare(tmp_path / a, tmp_path / b, resamples=200)


def test_too_few_resamples_are_refused(seg_pair):
    a, b = seg_pair
    with pytest.raises(TfBusError, match="resamples"):
        compare(a, b, resamples=10)


def test_load_results_finds_another_split(tmp_path):
    write(tmp_path / "run" / "eval_validation" / "metrics.json", [seg_row("benign (1)", 0.5, 0.5)])
    kind, rows, file = load_results(tmp_path / "run", split="validation")
    assert kind == "segmenter" and list(rows) == ["benign (1)"] and file.parent.name == "eval_validation"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tf_bus.cli", "compare", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def test_cli_writes_json_and_png_and_prints_the_table(seg_pair, tmp_path):
    a, b = seg_pair
    out, plot = tmp_path / "out" / "cmp.json", tmp_path / "out" / "cmp.png"
    r = _cli(a, b, "--out", out, "--plot", plot, "--resamples", "500", "--labels", "plain,deep supervision")
    assert r.returncode == 0, r.stderr
    saved = json.loads(out.read_text())
    assert saved["lesion_images"]["metrics"]["dice"] == compare(a, b, resamples=500)["lesion_images"]["metrics"]["dice"]
    assert "_dice" not in saved and plot.read_bytes()[:4] == b"\x89PNG"
    assert "dice" in r.stdout and "95% CI" in r.stdout and "wrong place" in r.stdout
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no temporary file left"


@pytest.mark.parametrize("args,message", [
    (["{tmp}/nothing", "{tmp}/nothing"], "no such file or folder"),
    (["{a}", "{a}", "--resamples", "5"], "resamples"),
    (["{a}", "{a}", "--labels", "one"], "--labels"),
])
def test_cli_errors_are_one_line(args, message, seg_pair, tmp_path):
    a, _ = seg_pair
    r = _cli(*[x.format(tmp=tmp_path, a=a) for x in args])
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
