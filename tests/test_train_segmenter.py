"""`tf-bus train-segmenter` / `evaluate-segmenter` end to end with a tiny U-Net on synthetic data."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import keras
import pytest
import tensorflow as tf

from conftest import cli
from tf_bus.config import AugmentConfig, ClassifierConfig, ConfigError, SegmenterConfig
from tf_bus.data.busi import TfBusError
from tf_bus.training.precision import cpu_has_native_bf16, resolve_precision
from tf_bus.training.segmentation import load_run_config, train_segmenter

pytestmark = pytest.mark.slow

TINY = ["--image-size", "32", "--depth", "2", "--base-filters", "4", "--batch-size", "8", "--quiet"]


def tiny_config(**kw) -> SegmenterConfig:
    base = dict(image_size=(32, 32), depth=2, base_filters=4, batch_size=8, epochs=2, warmup_epochs=0)
    return SegmenterConfig(**{**base, **kw})


def _process(*args, **popen):
    """A `tf-bus` process (for the tests that kill one); the others run it in process (conftest.cli)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen([sys.executable, "-m", "tf_bus.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **popen)


@pytest.fixture(scope="module")
def tiny_run(prepared, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    summary = train_segmenter(prepared, run, tiny_config(profile_batches=(1, 2)), verbose=0)
    return run, summary


def test_run_dir_contents(tiny_run):
    run, summary = tiny_run
    for name in ("config.json", "best.keras", "last.keras", "history.csv", "history.json"):
        assert (run / name).is_file(), name
    assert not (run / "backup").exists(), "BackupAndRestore state is removed once a run finishes"
    cfg, record = load_run_config(run)
    assert cfg == tiny_config(profile_batches=(1, 2)) and record["precision"] == resolve_precision("auto")
    # conftest imports tf_bus before TensorFlow, as `tf-bus` does: oneDNN is on.
    assert record["onednn"] is True and record["tensorflow_version"] == tf.__version__
    # The hardware `auto` decided on: one "major.minor" (or null) per visible GPU.
    assert len(record["gpu_compute_capabilities"]) == len(tf.config.list_physical_devices("GPU"))
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1] and "val_dice" in rows[0]
    assert summary["epochs_run_in_this_fit"] == 2 and 0 <= summary["best_val_dice"] <= 1
    model = keras.saving.load_model(run / "best.keras")
    assert model.output_shape == (None, 32, 32, 1)
    diag = json.loads((run / "diagnostics.json").read_text())
    assert set(diag["rules"]) == {"vanishing_gradient", "exploding_gradient", "overfit", "poor_weight_initialization",
                                  "loss_not_decreasing"} and diag["gradient_checks"] >= 1
    assert "| rule | fired |" in (run / "diagnostics.md").read_text()


def test_profiler_trace_and_overlays(tiny_run):
    run, _ = tiny_run
    traces = list((run / "logs" / "train" / "plugins" / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    assert list((run / "logs" / "overlays").glob("events.out.tfevents.*"))


def test_finished_run_is_not_overwritten_silently(tiny_run, prepared):
    run, _ = tiny_run
    with pytest.raises(TfBusError, match="--overwrite"):
        train_segmenter(prepared, run, tiny_config(), verbose=0)


def test_evaluate_cli_schema(tiny_run, prepared):
    run, _ = tiny_run
    r = cli("evaluate-segmenter", run, "--data", prepared, "--choose-threshold", "--tta")  # in process
    assert r.returncode == 0, r.stderr
    result = json.loads((run / "eval_test" / "metrics.json").read_text())
    assert set(result) == {"settings", "aggregate", "per_image"}
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert len(result["per_image"]) == sum(manifest["counts_before_balancing"]["test"].values())
    row = next(r for r in result["per_image"] if r["lesion"])
    assert {"name", "tpr", "fpr", "jaccard", "dice", "precision", "hd95", "fp_area_fraction"} <= set(row)
    normal = next(r for r in result["per_image"] if not r["lesion"])
    assert normal["dice"] is None and isinstance(normal["predicted_empty"], bool)
    assert set(result["aggregate"]) == {"lesion_images", "normal_images"}
    lesions = [r for r in result["per_image"] if r["lesion"]]
    assert result["aggregate"]["lesion_images"]["failures"] == {
        "dice_below_0.5": sum(r["dice"] < 0.5 for r in lesions), "no_overlap": sum(r["tpr"] == 0 for r in lesions),
        "predicted_empty": sum(r["predicted_empty"] for r in lesions)}
    choice = json.loads((run / "threshold.json").read_text())
    assert choice["threshold"] == result["settings"]["threshold"]
    assert choice["postprocess"] == result["settings"]["postprocess"] in ("none", "largest")
    assert (run / "eval_test" / "overlays.png").read_bytes()[:4] == b"\x89PNG"
    # tf-bus compare reads the real evaluation: against itself, every difference is 0.
    from tf_bus.comparison import compare

    paired = compare(run, run, resamples=200)
    assert paired["kind"] == "segmenter" and paired["shared_cases"] == len(result["per_image"])
    dice = paired["lesion_images"]["metrics"]["dice"]
    assert dice["a"] == pytest.approx(result["aggregate"]["lesion_images"]["dice"]["mean"])
    assert dice["difference"] == 0 and dice["ci95"] == [0.0, 0.0]


def test_attention_flags_reach_the_model_evaluation_and_export(prepared, tmp_path):
    import numpy as np

    from tf_bus.export import export_run

    run = tmp_path / "run"
    r = cli("train-segmenter", "--data", prepared, "--out", run, *TINY, "--epochs", "1", "--no-diagnostics",
            "--attention-gates", "--transformer-blocks", "1", "--transformer-heads", "2")
    assert r.returncode == 0, r.stderr
    cfg, _ = load_run_config(run)
    assert (cfg.attention_gates, cfg.transformer_blocks, cfg.transformer_heads) == (True, 1, 2)
    model = keras.saving.load_model(run / "best.keras")
    assert model.get_layer("bottleneck_transformer0").num_heads == 2 and model.get_layer("up0_attention_gate")
    r = cli("evaluate-segmenter", run, "--data", prepared, "--tta")
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "eval_test" / "metrics.json").read_text())["aggregate"]["lesion_images"]["n"] > 0
    info = export_run(run, tmp_path / "models", "seg")
    x = np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32)
    served = tf.saved_model.load(info["path"]).signatures["predict_tensor"](images=tf.constant(x * 255.0))
    np.testing.assert_allclose(served["mask_probabilities"].numpy(), model(x, training=False).numpy()[..., 0], atol=1e-5)


def test_deep_supervision_run_saves_plain_unets_and_its_diagnostics_see_the_unet(prepared, tmp_path):
    run = tmp_path / "run"
    r = cli("train-segmenter", "--data", prepared, "--out", run, *TINY, "--epochs", "2", "--deep-supervision", "1")
    assert r.returncode == 0, r.stderr
    cfg, record = load_run_config(run)
    assert cfg.deep_supervision == 1
    for name in ("best.keras", "last.keras"):
        model = keras.saving.load_model(run / name)
        assert model.__class__.__name__ == "UNet" and not [l for l in model.layers if l.name.startswith("aux")]
        assert model.output_shape == (None, 32, 32, 1)
    assert record["parameters"] == model.count_params(), "config.json counts the U-Net the run saves"
    diag = json.loads((run / "diagnostics.json").read_text())
    assert diag["gradient_checks"] >= 1
    measured = diag["rules"]["poor_weight_initialization"]["measured"]  # the U-Net's ReLUs were probed
    assert measured["activation_variance_first"] > 0
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1] and {"loss", "dice", "val_loss", "val_dice"} <= set(rows[0])
    r = cli("evaluate-segmenter", run, "--data", prepared)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("bad,message", [(dict(deep_supervision=5), r"within 1..depth-1 = 1..4"),
                                         (dict(deep_supervision=-1), "deep_supervision"),
                                         (dict(deep_supervision=1, padding="valid", image_size=(188, 188), depth=2),
                                          "padding='same'"),
                                         (dict(transformer_blocks=-1), "transformer_blocks"),
                                         (dict(transformer_blocks=1, transformer_heads=3), r"2\*\*depth = 512 channels"),
                                         (dict(image_size=(100, 100)), r"divisible by 2\*\*depth=32"),
                                         (dict(channels=2), "channels"),
                                         (dict(upsampling="nearest"), "upsampling"),
                                         (dict(copy_paste=1.5), r"`copy_paste` must be a probability"),
                                         (dict(copy_paste=-0.1), "copy_paste"),
                                         (dict(transformer_blocks=1, transformer_heads=0), "transformer_heads")])
def test_bad_model_settings_are_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        SegmenterConfig(**bad)
    assert SegmenterConfig(transformer_heads=3).transformer_heads == 3, "heads are only checked with blocks"


def test_lesion_only_trains_without_normals_and_evaluation_still_scores_them(prepared, tmp_path):
    from tf_bus.data.pipeline import count_segmentation_examples
    from tf_bus.evaluation import evaluate_segmenter

    run = tmp_path / "run"
    summary = train_segmenter(prepared, run, tiny_config(epochs=1, lesion_only=True, diagnostics=False), verbose=0)
    cfg, _ = load_run_config(run)
    assert cfg.lesion_only is True
    lesions = count_segmentation_examples(prepared, "train", lesion_only=True)
    assert lesions < count_segmentation_examples(prepared, "train")
    assert summary["train_images"] == lesions
    result = evaluate_segmenter(run, prepared, "test")
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert len(result["per_image"]) == sum(manifest["counts_before_balancing"]["test"].values())
    assert result["aggregate"]["normal_images"]["n"] == manifest["counts_before_balancing"]["test"]["normal"] > 0


def test_a_copy_paste_run_trains_and_records_it(prepared, tmp_path):
    import math

    run = tmp_path / "run"
    summary = train_segmenter(prepared, run, tiny_config(epochs=1, copy_paste=1.0, diagnostics=False), verbose=0)
    cfg, _ = load_run_config(run)
    assert cfg.copy_paste == 1.0 and summary["epochs_run_in_this_fit"] == 1
    row = next(csv.DictReader((run / "history.csv").open()))
    assert math.isfinite(float(row["loss"])) and math.isfinite(float(row["val_loss"]))


@pytest.mark.parametrize("flags", [[], ["--deep-supervision", "1"]], ids=["unet", "deep_supervision"])
def test_killed_run_resumes_from_its_last_epoch(flags, prepared, tmp_path):
    run = tmp_path / "run"
    args = ["train-segmenter", "--data", str(prepared), "--out", str(run), "--epochs", "12", "--patience", "0",
            *TINY, *flags]
    p = _process(*args)
    deadline = time.monotonic() + 240
    history = run / "history.csv"
    while time.monotonic() < deadline:
        if history.exists() and len(history.read_text().splitlines()) >= 3:  # header + 2 epochs
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    done = len(history.read_text().splitlines()) - 1
    assert 2 <= done < 12, "killed mid-way"
    assert (run / "backup").exists()
    p = _process(*args)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert '"resumed": true' in out
    epochs = [int(r["epoch"]) for r in csv.DictReader(history.open())]
    assert epochs == list(range(12)), epochs  # one row per epoch, wherever the kill landed
    assert epochs[:done] == list(range(done)), "completed epochs kept"


AUGMENT_BEFORE = AugmentConfig(rotation_deg=10, zoom=0.1, translate=0.05, brightness=0.1, contrast=0.1)
SAVED_BEFORE = [  # a config.json written before the field existed, and what that run did
    (SegmenterConfig, "lesion_only", False),  # those runs trained on every image
    (SegmenterConfig, "augmentation", AUGMENT_BEFORE),
    (ClassifierConfig, "augmentation", AUGMENT_BEFORE),
    (SegmenterConfig, "deterministic", False),  # tf.data's order was free, no op determinism
    (SegmenterConfig, "deep_supervision", 0),  # the U-Net's own output alone was trained
    (SegmenterConfig, "copy_paste", 0.0),  # nothing was pasted
    (ClassifierConfig, "deterministic", False),
]


@pytest.mark.parametrize("cls,name,before", SAVED_BEFORE)
def test_fields_added_later_read_as_what_older_runs_did(cls, name, before):
    saved = cls().to_dict()
    assert cls.from_dict(saved) == cls(), "a round trip keeps today's values"
    del saved[name]
    assert getattr(cls.from_dict(saved), name) == before


@pytest.mark.parametrize("cls", [SegmenterConfig, ClassifierConfig])
def test_augmentation_saved_before_the_intensity_ranges_reads_them_as_off(cls):
    saved = cls(augmentation=dataclasses.replace(cls().augmentation, gamma=0.5, noise=0.05, blur=1.0)).to_dict()
    for name in ("gamma", "noise", "blur"):
        del saved["augmentation"][name]
    aug = cls.from_dict(saved).augmentation
    assert (aug.gamma, aug.noise, aug.blur) == (0.0, 0.0, 0.0)  # those runs had none
    assert aug.rotation_deg == cls().augmentation.rotation_deg  # the rest as saved


@pytest.mark.parametrize("cls", [SegmenterConfig, ClassifierConfig])
@pytest.mark.parametrize("saved_change, resumes, named", [
    # saved before the field existed: its old meaning is today's
    (lambda r: r["config"].pop("deterministic"), True, None),
    (lambda r: r["config"].update(seed=r["config"]["seed"] + 1), False, "config.seed: 1338 in it, 1337 now"),
    (lambda r: r["config"].update(unknown_field=1), False, "config.unknown_field: 1 in it, '(unset)' now"),
    (lambda r: r.update(data="/moved"), False, "data: '/moved' in it, '/data' now"),  # the data moved
])
def test_an_unfinished_run_resumes_only_with_the_config_it_was_started_with(cls, saved_change, resumes, named,
                                                                           tmp_path):
    from tf_bus.training.common import check_run_dir

    record = {"config": json.loads(json.dumps(cls().to_dict())), "data": "/data", "splits_file": None}
    saved = json.loads(json.dumps(record))
    saved_change(saved)
    (tmp_path / "backup").mkdir()
    (tmp_path / "config.json").write_text(json.dumps(saved))
    if resumes:
        assert check_run_dir(tmp_path, record, overwrite=False, config_class=cls) is True
    else:
        with pytest.raises(TfBusError, match="unfinished run with another config") as err:
            check_run_dir(tmp_path, record, overwrite=False, config_class=cls)
        assert f"({named})" in str(err.value), "the message names the one setting that differs"


@pytest.mark.parametrize("saved, wanted, message", [
    ({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 2}}, ""),
    ({"a": 1}, {"a": 2}, "a: 1 in it, 2 now"),
    ({"b": {"c": [1, 2]}}, {"b": {"c": [1, 3]}}, "b.c: [1, 2] in it, [1, 3] now"),
    ({"b": {}}, {"b": {"new": True}}, "b.new: '(unset)' in it, True now"),
    ({"b": {"c": 1}}, {"b": 5}, "b: {'c': 1} in it, 5 now"),
    ({f"k{i}": i for i in range(6)}, {f"k{i}": -i for i in range(1, 7)} | {"k0": 0},
     "k1: 1 in it, -1 now; k2: 2 in it, -2 now; k3: 3 in it, -3 now; k4: 4 in it, -4 now; and 2 more"),
])
def test_a_refused_resume_names_what_changed(saved, wanted, message):
    from tf_bus.training.common import settings_changes

    assert settings_changes(saved, wanted) == message


SEG = {"config": {"depth": 5, "loss": "bce_dice"}, "data": "/data"}
CLF = {"config": {"backbone": "resnet50"}, "data": "/data"}


@pytest.mark.parametrize("text, expected, kind, message", [
    (json.dumps(SEG), None, "segmenter", None),
    (json.dumps(CLF), None, "classifier", None),
    (json.dumps(SEG), "segmenter", "segmenter", None),
    (json.dumps(CLF), "classifier", "classifier", None),
    (json.dumps({**SEG, "kind": "classifier"}), None, "classifier", None),  # `kind` wins over the guess
    (None, "segmenter", None, r"config.json: missing; is .* a `tf-bus train-segmenter` run folder\?"),
    (None, None, None, r"config.json: missing; is .* a `tf-bus train-segmenter` or `train-classifier` run folder"),
    ("{not json", "classifier", None, r"config.json: cannot be read as JSON .*train-classifier"),
    (json.dumps([1, 2]), None, None, r'has no "config" object'),
    (json.dumps({"data": "/d"}), "segmenter", None, r'has no "config" object'),
    (json.dumps({**SEG, "kind": "fusion"}), None, None, r"kind 'fusion' is not a training run's"),
    (json.dumps(SEG), "classifier", None,
     r"holds a `tf-bus train-segmenter` run, not a train-classifier one; evaluate it with `tf-bus evaluate-segmenter`"),
    (json.dumps(CLF), "segmenter", None, r"holds a `tf-bus train-classifier` run.*`tf-bus evaluate-classifier`"),
    (json.dumps({**SEG, "kind": "segmenter", "folds": 5}), "segmenter", None,
     r"is a 5-fold cross-validation of the segmenter; its models are in .*/fold_0 to fold_4\. Pass one fold"),
    (json.dumps({**CLF, "kind": "classifier", "folds": 3}), None, None, r"3-fold cross-validation of the classifier"),
])
def test_run_folders_are_read_or_refused_naming_the_fix(text, expected, kind, message, tmp_path):
    from tf_bus.training.common import read_run_record

    if text is not None:
        (tmp_path / "config.json").write_text(text)
    if message is None:
        assert read_run_record(tmp_path, expected) == (kind, json.loads(text))
    else:
        with pytest.raises(TfBusError, match=message):
            read_run_record(tmp_path, expected)


@pytest.mark.parametrize("argv, record, message", [
    (["evaluate-classifier", "{run}", "--data", "{run}"], SEG, "evaluate it with `tf-bus evaluate-segmenter`"),
    (["evaluate-segmenter", "{run}", "--data", "{run}"], CLF, "evaluate it with `tf-bus evaluate-classifier`"),
    (["explain", "{run}", "{run}/x.png"], {**CLF, "kind": "classifier", "folds": 5},
     "Pass one fold's folder here. The whole folder goes to `tf-bus compare`, `fuse`, and, as its folds averaged, "
     "`export`, `predict --run` and the evaluate commands."),
    (["evaluate-segmenter", "{run}", "--data", "{run}"], {**SEG, "kind": "segmenter", "folds": 5},
     "the cross-validation has not finished (no cross_validation.json)"),
    (["export", "{run}", "--model-base-path", "{run}/m", "--name", "x"], {**SEG, "kind": "segmenter", "folds": 5},
     "the cross-validation has not finished (no cross_validation.json); run the same `tf-bus train-segmenter "
     "--folds 5` command again"),
])
def test_commands_refuse_the_wrong_run_folder_in_one_line(argv, record, message, tmp_path, capsys):
    from tf_bus.cli import main

    (tmp_path / "config.json").write_text(json.dumps(record))
    assert main([a.format(run=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"], "nothing written"


@pytest.mark.parametrize("existed, writes, kept", [
    (False, [], False),  # a refused run: no empty RUN_DIR is left
    (False, ["logs/"], False),  # only empty folders: removed too
    (False, ["config.json"], True),  # it wrote something: kept as it is
    (False, ["logs/train/events"], True),
    (True, [], True),  # the folder was there before: kept
])
def test_a_failed_run_leaves_no_empty_run_dir_and_never_removes_files(existed, writes, kept, tmp_path):
    from tf_bus.training.common import leaves_no_empty_run_dir

    run_dir = tmp_path / "made" / "by" / "run"
    if existed:
        run_dir.mkdir(parents=True)

    @leaves_no_empty_run_dir
    def train(data, run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in writes:
            (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
            if not name.endswith("/"):
                (run_dir / name).write_text("x")
        raise TfBusError("refused")

    with pytest.raises(TfBusError, match="refused"):
        train("data", run_dir)
    assert run_dir.exists() == kept
    assert (tmp_path / "made").exists() == kept, "the parents the run made go with it"
    for name in writes:
        assert (run_dir / name).exists() == kept


def test_lesion_only_is_the_default():
    assert SegmenterConfig().lesion_only is True


def test_bad_config_values():
    with pytest.raises(ConfigError, match="boundary_bce_dice. Received: loss='dicey'"):
        SegmenterConfig(loss="dicey")
    with pytest.raises(ConfigError, match="profile_batches"):
        SegmenterConfig(profile_batches=(5, 2))


@pytest.mark.parametrize("before", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("fails", [False, True])
def test_precision_policy_restores_the_policy_before_it(before, fails):
    from tf_bus.training.precision import precision_policy

    other = "float32" if before == "mixed_bfloat16" else "mixed_bfloat16"
    keras.mixed_precision.set_global_policy(before)
    try:
        with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
            with precision_policy(other) as policy:
                assert policy == other == keras.mixed_precision.global_policy().name
                if fails:
                    raise RuntimeError("bad data")
        assert keras.mixed_precision.global_policy().name == before
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("trainer", ["segmenter", "classifier"])
def test_a_run_that_fails_on_its_data_leaves_the_precision_as_it_was(trainer, tmp_path):
    from tf_bus.training.classification import train_classifier

    (tmp_path / "data" / "train").mkdir(parents=True)  # a folder that is no layout
    train, config = {"segmenter": (train_segmenter, tiny_config(precision="mixed_bfloat16")),
                     "classifier": (train_classifier, ClassifierConfig(image_size=(32, 32), precision="mixed_bfloat16"))}[trainer]
    with pytest.raises(TfBusError):
        train(tmp_path / "data", tmp_path / "run", config, verbose=0)
    assert keras.mixed_precision.global_policy().name == "float32"


@pytest.mark.parametrize("flags,expected", [("fpu avx2 fma", False), ("fpu avx512f avx512_bf16", True),
                                            ("amx_bf16 amx_tile", True)])
def test_native_bf16_detection(flags, expected):
    assert cpu_has_native_bf16(f"processor : 0\nflags\t\t: {flags}\n") is expected


@pytest.mark.parametrize("env,expected", [(None, True), ("1", True), ("0", False)])
def test_importing_tf_bus_first_turns_onednn_on_unless_told_not_to(env, expected):
    code = ("import os, tf_bus, tensorflow; from tf_bus.training.precision import onednn_enabled; "
            "print(os.environ['TF_ENABLE_ONEDNN_OPTS'], onednn_enabled())")
    environ = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if env is not None:
        environ["TF_ENABLE_ONEDNN_OPTS"] = env
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [env or "1", str(expected)]
