"""`--ensemble K`: K seeds on one split, exported and evaluated as their average."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import CV_SEGMENTER_FLAGS, TEST_BACKBONE, built_once, cli
from tf_bus.data.busi import TfBusError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ensembles(prepared, tmp_path_factory):
    """A 2-member U-Net ensemble trained through the CLI and a 2-member ResNet one through
    ``train_ensemble``, both on the prepared synthetic data. Read-only (copy to change)."""
    from tf_bus.config import ClassifierConfig
    from tf_bus.training.ensemble import train_ensemble

    def build(root):
        r = cli("train-segmenter", "--data", prepared, "--out", root / "seg", "--ensemble", "2", "--seed", "5",
                *CV_SEGMENTER_FLAGS)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "the members averaged: export, predict --run and evaluate" in r.stdout
        config = ClassifierConfig(backbone=TEST_BACKBONE, image_size=(32, 32), batch_size=8, epochs=1,
                                  warmup_epochs=0, time_budget_minutes=0, diagnostics=False)
        train_ensemble("classifier", prepared, root / "clf", config, members=2, tta=False, verbose=0)

    root = built_once(tmp_path_factory, "ensembles", build)
    return {"segmenter": root / "seg", "classifier": root / "clf"}


@pytest.mark.parametrize("kind", ["segmenter", "classifier"])
def test_members_differ_by_seed_and_the_folder_is_complete(ensembles, kind):
    run = ensembles[kind]
    record = json.loads((run / "config.json").read_text())
    seeds = [json.loads((run / f"member_{k}" / "config.json").read_text())["config"]["seed"] for k in range(2)]
    base = 5 if kind == "segmenter" else 1337
    assert record["ensemble"] == 2 and record["seeds"] == seeds == [base, base + 1]
    summary = json.loads((run / "ensemble.json").read_text())
    assert [m["seed"] for m in summary["members"]] == seeds
    assert (run / "eval_validation" / "metrics.json").is_file()
    if kind == "segmenter":
        choice = json.loads((run / "threshold.json").read_text())
        scored = json.loads((run / "eval_validation" / "metrics.json").read_text())["settings"]
        assert (scored["threshold"], scored["postprocess"]) == (choice["threshold"], choice["postprocess"])
        assert summary["validation"]["lesion_images"]["n"] > 0
    else:
        assert 0.0 <= summary["validation"]["accuracy"] <= 1.0


@pytest.mark.parametrize("kind, key", [("segmenter", "mask_probabilities"), ("classifier", "probabilities")])
def test_an_ensemble_exports_the_mean_of_its_members(ensembles, tmp_path, kind, key):
    from tf_bus.export import export_run, local_predictor

    import io

    from PIL import Image

    rng = np.random.default_rng(3)
    images = []
    for shape in [(40, 56), (50, 30)]:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
    run = ensembles[kind]
    info = export_run(run, tmp_path / "models", "busi")
    meta = json.loads((tmp_path / "models" / "busi" / "1" / "assets.extra" / "tf_bus.json").read_text())
    assert info["ensemble"] == meta["ensemble"] == 2 and meta["folds"] is None
    assert meta["source_run"] == str(run.resolve())
    _, served = local_predictor(run)
    got = served(images)[key]
    members = [local_predictor(run / f"member_{k}")[1](images)[key] for k in range(2)]
    assert float(np.abs(members[0] - members[1]).max()) > 1e-3, "the seeds give different models"
    np.testing.assert_allclose(got, (members[0] + members[1]) / 2.0, atol=4e-3)
    if kind == "segmenter":
        threshold = json.loads((run / "threshold.json").read_text())["threshold"]
        assert meta["threshold"] == pytest.approx(threshold)


def test_evaluate_scores_the_average_on_the_held_out_split(ensembles, prepared, tmp_path):
    from tf_bus.evaluation import evaluate_classifier, evaluate_segmenter, predict_split

    seg = tmp_path / "seg"
    shutil.copytree(ensembles["segmenter"], seg)
    result = evaluate_segmenter(seg, prepared, "test")
    assert result["settings"]["threshold"] == pytest.approx(json.loads((seg / "threshold.json").read_text())["threshold"])
    averaged = {p[0]: p[2] for p in predict_split(seg, prepared, "test")}
    members = [{p[0]: p[2] for p in predict_split(seg / f"member_{k}", prepared, "test")} for k in range(2)]
    assert sorted(averaged) == sorted(r["name"] for r in result["per_image"])
    for name, prob in averaged.items():
        np.testing.assert_allclose(prob, (members[0][name] + members[1][name]) / 2.0, atol=1e-4)

    clf = tmp_path / "clf"
    shutil.copytree(ensembles["classifier"], clf)
    result = evaluate_classifier(clf, prepared, "test")
    members = [{r["name"]: np.array(r["probabilities"]) for r in
                evaluate_classifier(clf / f"member_{k}", prepared, "test")["per_image"]} for k in range(2)]
    for row in result["per_image"]:
        np.testing.assert_allclose(row["probabilities"], (members[0][row["name"]] + members[1][row["name"]]) / 2.0,
                                   atol=4e-3)
    with pytest.raises(TfBusError, match="average is of its members' best.keras; leave out --checkpoint last"):
        evaluate_classifier(clf, prepared, "test", checkpoint="last")
    with pytest.raises(TfBusError, match="not a train-segmenter one"):
        evaluate_segmenter(clf, prepared, "test")


def test_resume_keeps_finished_members_and_other_settings_are_refused(ensembles, prepared, tmp_path):
    seg = tmp_path / "seg"
    shutil.copytree(ensembles["segmenter"], seg)
    before = (seg / "member_0" / "best.keras").stat().st_mtime_ns
    shutil.rmtree(seg / "member_1")  # a member never trained
    (seg / "ensemble.json").unlink()
    r = cli("train-segmenter", "--data", prepared, "--out", seg, "--ensemble", "2", "--seed", "5", *CV_SEGMENTER_FLAGS)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "member 2 of 2 (seed 6)" in r.stdout and "member 1 of 2" not in r.stdout
    assert (seg / "member_0" / "best.keras").stat().st_mtime_ns == before
    assert (seg / "member_1" / "best.keras").is_file() and (seg / "ensemble.json").is_file()

    r = cli("train-segmenter", "--data", prepared, "--out", seg, "--ensemble", "2", "--seed", "9", *CV_SEGMENTER_FLAGS)
    assert r.returncode != 0 and "holds a run with other settings" in r.stderr and "seed" in r.stderr


@pytest.mark.parametrize("flags, message", [
    (["--ensemble", "0"], "--ensemble must be at least 1"),
    (["--ensemble", "2", "--folds", "2"], "pass one of them"),
    (["--ensemble", "2", "--strategy", "multiworker"], "does not combine with --strategy multiworker"),
])
def test_ensemble_flag_refusals(prepared, tmp_path, flags, message):
    r = cli("train-segmenter", "--data", prepared, "--out", tmp_path / "run", *flags, *CV_SEGMENTER_FLAGS)
    assert r.returncode != 0 and message in r.stderr
    assert not (tmp_path / "run").exists()


def test_unfinished_ensembles_and_single_run_commands_say_what_to_do(ensembles, tmp_path):
    from tf_bus.export import export_run
    from tf_bus.training.common import read_run_record

    with pytest.raises(TfBusError, match=r"is a 2-member ensemble of the segmenter; its models are in .*member_0"):
        read_run_record(ensembles["segmenter"])
    seg = tmp_path / "seg"
    shutil.copytree(ensembles["segmenter"], seg)
    (seg / "member_1" / "history.json").unlink()
    with pytest.raises(TfBusError, match=r"member_1: unfinished or missing, so the ensemble would lack member 1; "
                                         r"run the same `tf-bus train-segmenter --ensemble 2` command again"):
        export_run(seg, tmp_path / "models", "busi")
