"""The `tf-bus` command: every subcommand's --help, clear errors without tracebacks, the demo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli
from tf_bus.cli import build_parser, main

SUBCOMMANDS = ["demo", "synth", "check", "prepare", "eda", "train-segmenter", "evaluate-segmenter", "train-classifier",
               "evaluate-classifier", "tune", "compare", "fuse", "fuse-predict", "export", "serve", "predict",
               "explain"]


def _run(*args, cwd=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "tf_bus.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_explains_every_flag(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    parser = build_parser()
    subparser = parser._subparsers._group_actions[0].choices[sub]
    for action in subparser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{sub} {action.option_strings} has no help"
            assert action.option_strings[0] in text


@pytest.mark.parametrize("sub", ["train-segmenter", "train-classifier"])
def test_augmentation_flags_reach_the_config(sub):
    from tf_bus.cli import _training_kwargs

    args = build_parser().parse_args([sub, "--data", "d", "--out", "r", "--rotation-deg", "12", "--contrast", "0.3",
                                      "--gamma", "0.5", "--noise", "0.05", "--blur", "1.5"])
    aug = _training_kwargs(args)["augmentation"]
    assert (aug.rotation_deg, aug.contrast, aug.gamma, aug.noise, aug.blur) == (12.0, 0.3, 0.5, 0.05, 1.5)
    default = _training_kwargs(build_parser().parse_args([sub, "--data", "d", "--out", "r"]))["augmentation"]
    assert (default.gamma, default.noise, default.blur) == (0.0, 0.0, 0.0)  # off unless asked for


def test_console_script_installed():
    exe = Path(sys.executable).with_name("tf-bus")
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("tf-bus ")


ERRORS = [
    (["prepare", "{missing}", "{tmp}/out"], "no such directory"),
    (["check", "{tmp}"], "not a BUSI release"),
    (["synth", "{tmp}/s", "--n", "3"], "at least 9"),
    (["prepare", "{release}", "{tmp}/o", "--split", "0.5,0.5,0.5"], "must add up to 1"),
    (["prepare", "{release}", "{tmp}/o", "--near-threshold", "1.5"], "near_threshold"),
    (["train-segmenter", "--data", "{release}", "--out", "{tmp}/r", "--zoom", "1.5"], "(flag --zoom) must be within [0, 1)"),
    (["train-classifier", "--data", "{release}", "--out", "{tmp}/r", "--rotation-deg", "-5"],
     "(flag --rotation-deg) must be within [0, 180)"),
    (["train-segmenter", "--data", "{release}", "--out", "{tmp}/r", "--image-size", "100"],
     "image_size must be divisible by 2**depth=32. Received: image_size=(100, 100)"),
    (["train-segmenter", "--data", "{release}", "--out", "{tmp}/r", "--transformer-blocks", "1", "--transformer-heads", "3"],
     "`transformer_heads` must divide"),
    (["train-segmenter", "--data", "{release}", "--out", "{tmp}/r", "--deep-supervision", "5"],
     "`deep_supervision` must be 0 (off) or within 1..depth-1 = 1..4"),
    (["train-segmenter", "--data", "{release}", "--out", "{tmp}/r", "--copy-paste", "1.5"],
     "`copy_paste` must be a probability in [0, 1]"),
    # Refused after the trainer made its RUN_DIR (and a parent): the empty folders go again.
    (["train-segmenter", "--data", "{missing}", "--out", "{tmp}/r/deep"], "no such directory"),
    (["train-classifier", "--data", "{release}", "--out", "{tmp}/r/deep", "--weights", "{tmp}/none.h5"],
     "no such weights file"),
]


@pytest.mark.parametrize("argv,message", ERRORS)
def test_errors_are_one_line_messages(argv, message, synthetic_release, tmp_path):
    """In process (a `tf-bus` process would spend 5 s importing TensorFlow for each): an
    exception that escaped `main` would fail the test with its traceback; as processes, see
    test_check_and_prepare_with_skip_bad and test_a_refused_run_exits_2_as_a_process."""
    argv = [a.format(missing=tmp_path / "nope", tmp=tmp_path, release=synthetic_release) for a in argv]
    r = cli(*argv)  # conftest.cli: main() in process, SystemExit (argparse's refusals) as the exit code
    code, err = r.returncode, r.stderr
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) <= 2, err  # argparse adds its usage line
    assert not (tmp_path / "r").exists(), "a refused run leaves no run folder behind"


def test_a_refused_run_exits_2_as_a_process(synthetic_release, tmp_path):
    r = _run("train-classifier", "--data", str(synthetic_release), "--out", str(tmp_path / "r" / "deep"),
             "--weights", str(tmp_path / "none.h5"))
    assert r.returncode == 2 and "no such weights file" in r.stderr and "Traceback" not in r.stderr
    # One line in all: TensorFlow's start-up lines are hidden at the level `tf-bus` sets (tf_bus.tflog).
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("tf-bus train-classifier: error: ")
    assert not (tmp_path / "r").exists()


def test_check_and_prepare_with_skip_bad(synthetic_release, tmp_path):
    root = tmp_path / "Dataset_BUSI_with_GT"
    shutil.copytree(synthetic_release, root)
    (root / "benign" / "stray.txt").write_text("x")
    r = _run("check", str(root))
    assert r.returncode == 2 and "stray.txt" in r.stderr and "--skip-bad" in r.stderr
    r = _run("check", str(root), "--skip-bad", "--json", str(tmp_path / "report.json"))
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["problems"][0]["kind"] == "not_an_image"
    assert ["benign/benign (1)", "benign/benign (2)"] in report["groups"]
    r = _run("prepare", str(root), str(tmp_path / "out"), "--skip-bad")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["problems"][0]["path"].endswith("stray.txt")


@pytest.mark.slow
def test_demo_on_synthetic_data(tmp_path):
    r = _run("demo", "--out", str(tmp_path / "demo"), "--n", "30")
    assert r.returncode == 0, r.stderr
    for line in ("prepare", "EDA", "classification layout", "segmentation layout", "raw release"):
        assert line in r.stdout
    assert (tmp_path / "demo" / "batch_preview.png").stat().st_size > 5000
    assert (tmp_path / "demo" / "prepared" / "eda" / "eda.json").is_file()
    for line in ("[6/9] U-Net", "ResNet50 from scratch", "[7/9] exported", "REST POST /v1/models/busi_classifier:predict",
                 "REST POST /v1/models/busi_segmenter:predict", "gRPC PredictionService.Predict busi_classifier",
                 "state 30 (30 = AVAILABLE)", "[9/9] server stopped"):
        assert line in r.stdout, line
    for model in ("busi_segmenter", "busi_classifier"):
        assert (tmp_path / "demo" / "models" / model / "1" / "saved_model.pb").is_file()
    # None of TensorFlow's INFO or WARNING lines at the CLI's level 2, the start-up ones included
    # (README, "Installing"; here only its DT_BOOL ERROR line remains).
    from tf_bus.tflog import hidden

    assert [line for line in r.stderr.splitlines() if hidden(line.encode(), 2)] == [], r.stderr
