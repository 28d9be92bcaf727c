"""The benchmark scripts run and print the JSON they promise (timings are not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tf_bus.tflog import hidden
from tf_bus.training.precision import resolve_precision

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str, timeout: int = 300) -> dict:
    """Runs benchmarks/SCRIPT with ARGS and returns the JSON it prints."""
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert [line for line in r.stderr.splitlines() if hidden(line.encode(), 3)] == [], r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.mark.parametrize("copy_paste,intensity", [(None, False), ("0.5", True)])
def test_loader_benchmark_prints_json(synthetic_release, copy_paste, intensity):
    flags = (["--copy-paste", copy_paste] if copy_paste else []) + (["--intensity"] if intensity else [])
    out = run_benchmark("loader_throughput.py", "--data", str(synthetic_release), "--size", "64", "--repeats", "1",
                        "--augment", *flags)
    assert out["images"] == 36
    for key in ("baseline_pil_loop_images_per_s", "loader_cold_epoch_images_per_s", "loader_cached_epoch_images_per_s"):
        assert out[key] > 0
    ratio = out["loader_cached_epoch_images_per_s"] / out["baseline_pil_loop_images_per_s"]
    assert abs(out["speedup_cached"] - ratio) <= 0.01 * ratio + 0.01
    if copy_paste:
        assert out["copy_paste"] == 0.5 and len(out["all_runs"]["copy_paste"]) == 1
        ratio = out["loader_cached_epoch_copy_paste_images_per_s"] / out["loader_cached_epoch_images_per_s"]
        assert abs(out["copy_paste_over_cached"] - ratio) <= 0.01 * ratio + 0.01
    else:
        assert "copy_paste" not in out and out["all_runs"]["copy_paste"] == []
    if intensity:
        assert out["intensity"] == {"gamma": 0.5, "noise": 0.05, "blur": 1.0} and len(out["all_runs"]["intensity"]) == 1
        ratio = out["loader_cached_epoch_intensity_images_per_s"] / out["loader_cached_epoch_images_per_s"]
        assert abs(out["intensity_over_cached"] - ratio) <= 0.01 * ratio + 0.01
    else:
        assert "intensity" not in out and out["all_runs"]["intensity"] == []


def test_segmenter_training_benchmark_prints_json_with_onednn_off_and_on():
    out = run_benchmark("segmenter_training.py", "--size", "32", "--base-filters", "4", "--depth", "2",
                        "--batch", "2", "--steps", "1", "--onednn", "both", "--rounds", "1", "--precisions", "float32")
    # Each child ran the setting it was given (TensorFlow's own report, not the flag echoed).
    assert out["onednn_active"] == {"off": [False], "on": [True]}
    for setting in ("off", "on"):
        [run] = out["runs"][setting]
        res = run["results"]["float32"]
        # 32x32, depth 2, 4 filters: the first conv alone is 2*32*32*9*1*4 FLOPs.
        assert res["forward_gflops_per_image"] > 2 * 32 * 32 * 9 * 4 / 1e9
        assert res["train_images_per_s"] > 0 and 0 < res["utilisation_of_peak"]
        assert out["median"][setting]["float32"]["train_images_per_s"] == pytest.approx(res["train_images_per_s"])
    rate = {s: out["median"][s]["float32"]["train_images_per_s"] for s in ("off", "on")}
    assert out["onednn_speedup"]["float32"] == pytest.approx(rate["on"] / rate["off"], rel=0.01)


def test_segmenter_training_benchmark_times_fused_against_keras_batch_norm():
    out = run_benchmark("segmenter_training.py", "--size", "32", "--base-filters", "4", "--depth", "2",
                        "--batch", "2", "--steps", "1", "--batch-norm", "both", "--bn-rounds", "2")
    assert out["batch_norm"] == "both" and out["onednn_active"] is True
    # No --precisions: the precision a default `tf-bus` run trains in on this machine.
    assert list(out["results"]) == [resolve_precision("auto")]
    res = out["results"][resolve_precision("auto")]
    fused, plain = res["fused_batch_norm"], res["keras_batch_norm"]
    assert fused["forward_gflops_per_image"] == plain["forward_gflops_per_image"]  # the same convolutions
    for r in (fused, plain):
        assert len(r["rates"]) == 2 and r["train_images_per_s"] == pytest.approx(sum(r["rates"]) / 2, rel=0.01)
    assert res["fused_batch_norm_speedup"] == pytest.approx(
        fused["train_images_per_s"] / plain["train_images_per_s"], rel=0.01)


def test_segmenter_training_benchmark_times_several_batch_sizes_side_by_side():
    out = run_benchmark("segmenter_training.py", "--size", "32", "--base-filters", "4", "--depth", "2",
                        "--batch", "2,4", "--steps", "1", "--bn-rounds", "2")
    assert out["batch"] == [2, 4]
    res = out["results"][resolve_precision("auto")]
    assert set(res) == {"batch_2", "batch_4"}
    for r in res.values():
        assert len(r["rates"]) == 2 and r["train_images_per_s"] == pytest.approx(sum(r["rates"]) / 2, rel=0.01)
        util = r["train_images_per_s"] * 3 * r["forward_gflops_per_image"] / r["matmul_peak_gflop_per_s"]
        assert r["utilisation_of_peak"] == pytest.approx(util, rel=0.02)
    assert res["batch_2"]["forward_gflops_per_image"] == res["batch_4"]["forward_gflops_per_image"]


def test_segmenter_training_benchmark_times_deep_supervision_side_by_side():
    out = run_benchmark("segmenter_training.py", "--size", "32", "--base-filters", "4", "--depth", "3",
                        "--batch", "4", "--deep-supervision", "0,2", "--steps", "1", "--bn-rounds", "2")
    assert out["deep_supervision"] == [0, 2]
    res = out["results"][resolve_precision("auto")]
    plain, supervised = res["deep_supervision_0"], res["deep_supervision_2"]
    # The U-Net counted once (not again through the wrapper), plus the heads' 1x1 convolutions
    # (16x16x8 and 8x8x16 inputs, one output channel); the JSON rounds GFLOPs to 4 places.
    heads = 2 * (16 * 16 * 8 + 8 * 8 * 16)
    extra = (supervised["forward_gflops_per_image"] - plain["forward_gflops_per_image"]) * 1e9
    assert -1e5 <= extra - heads <= 1e5 and plain["forward_gflops_per_image"] > 1e-3
    assert res["speed_over_deep_supervision_0"]["deep_supervision_2"] == pytest.approx(
        supervised["train_images_per_s"] / plain["train_images_per_s"], rel=0.01)


@pytest.mark.parametrize("flag, value, named", [
    ("--batch", "8,x", "8,x"), ("--batch", "0", "0"), ("--batch", "4,-2", "4,-2"),
    ("--deep-supervision", "5", "'5'"),
    ("--precisions", "bfloat16", "'bfloat16'"), ("--precisions", "auto,fp16", "'fp16'"),
])
def test_segmenter_training_benchmark_refuses_bad_lists(flag, value, named):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "segmenter_training.py"), flag, value],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert r.returncode == 2 and flag in r.stderr and named in r.stderr


@pytest.mark.parametrize("value, named", [("bfloat16", "'bfloat16'"), ("float32,fp16", "'fp16'")])
def test_classifier_training_benchmark_refuses_unknown_precisions(value, named):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "classifier_training.py"), "--precisions", value],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert r.returncode == 2 and "--precisions" in r.stderr and named in r.stderr and "mixed_float16" in r.stderr


def test_tf_data_autotune_benchmark_times_the_real_loader_both_ways(prepared):
    out = run_benchmark("tf_data_autotune.py", str(prepared), "--size", "32", "--depth", "2", "--base-filters", "4",
                        "--batch", "4", "--epochs", "2", "--rounds", "1", "--precision", "float32")
    n = out["train_images"]
    assert n > 0 and out["precision"] == "float32"
    for setting in ("off", "on"):
        res = out["results"][setting]
        [fit] = res["fits"]
        assert len(fit["epoch_seconds"]) == 2 and fit["train_images_per_s"] == res["train_images_per_s"] > 0
        # A fit lasts at least its epochs: the rate cannot beat the epochs' own.
        assert fit["train_images_per_s"] <= 2 * n / sum(fit["epoch_seconds"]) * 1.001
    assert out["off_speedup"] == pytest.approx(
        out["results"]["off"]["train_images_per_s"] / out["results"]["on"]["train_images_per_s"], rel=0.01)


def test_determinism_benchmark_times_each_setting_in_its_own_process(prepared):
    out = run_benchmark("determinism.py", str(prepared), "--size", "32", "--depth", "2", "--base-filters", "4",
                        "--batch", "4", "--epochs", "2", "--rounds", "1", "--precision", "float32")
    n = out["train_images"]
    assert n > 0 and out["precision"] == "float32"
    for setting, deterministic in (("off", False), ("on", True)):
        res = out["results"][setting]
        [fit] = res["fits"]
        # What TensorFlow and the dataset report as set in that child, not the flag echoed.
        assert fit["op_determinism"] is deterministic and fit["loader_deterministic"] is deterministic
        assert len(fit["epoch_seconds"]) == 2 and fit["train_images_per_s"] == res["train_images_per_s"] > 0
        assert fit["train_images_per_s"] <= 2 * n / sum(fit["epoch_seconds"]) * 1.001
    assert out["deterministic_slowdown"] == pytest.approx(
        out["results"]["off"]["train_images_per_s"] / out["results"]["on"]["train_images_per_s"], rel=0.01)


def test_classifier_training_benchmark_prints_json():
    out = run_benchmark("classifier_training.py", "--size", "32", "--backbones", "resnet50",
                        "--precisions", "float32,mixed_bfloat16", "--batch", "2", "--steps", "1")
    res = out["results"]["resnet50"]
    # ResNet50 is about 4.1 GMACs (8.2 GFLOPs) at 224 px; FLOPs scale with the pixel count.
    assert 0.8 * 8.2 * (32 / 224) ** 2 < res["float32"]["forward_gflops_per_image"] < 1.2 * 8.2 * (32 / 224) ** 2
    for precision in ("float32", "mixed_bfloat16"):
        assert res[precision]["train_images_per_s"] > 0 and 0 < res[precision]["utilisation_of_peak"]
        assert out["matmul_peak_gflop_per_s"][precision] > 0
    ratio = res["mixed_bfloat16"]["train_images_per_s"] / res["float32"]["train_images_per_s"]
    assert abs(res["bf16_speedup"] - ratio) <= 0.01 * ratio + 0.002


def test_classifier_training_benchmark_times_fused_against_keras_batch_norm_with_onednn_off():
    # One child, two resnet14s (quicker to trace than ResNet50s): the batch-norm comparison, and --onednn off,
    # which is applied before TensorFlow is imported (checking --precisions must not import it first).
    out = run_benchmark("classifier_training.py", "--size", "32", "--backbones", "resnet14",
                        "--precisions", "float32", "--batch", "2", "--steps", "1", "--batch-norm", "both",
                        "--onednn", "off")
    assert out["batch_norm"] == "both" and out["onednn_active"] is False
    res = out["results"]["resnet14"]["float32"]
    fused, plain = res["fused_batch_norm"], res["keras_batch_norm"]
    assert fused["parameters"] == plain["parameters"] and fused["forward_gflops_per_image"] == plain["forward_gflops_per_image"]
    assert fused["train_images_per_s"] > 0 and plain["train_images_per_s"] > 0
    assert res["fused_batch_norm_speedup"] == pytest.approx(
        fused["train_images_per_s"] / plain["train_images_per_s"], rel=0.01)
    assert "bf16_speedup" not in out["results"]["resnet14"]


def test_serving_latency_benchmark_prints_json():
    out = run_benchmark("serving_latency.py", "--requests", "3", "--clients", "2", "--per-client", "1", timeout=600)
    assert out["in_process"]["p50_ms"] > 0
    for proto in ("grpc", "rest"):
        entry = out["no_batching"][proto]
        assert entry["p50_ms"] <= entry["p99_ms"]
        assert abs(entry["p50_ratio_to_in_process"] - entry["p50_ms"] / out["in_process"]["p50_ms"]) < 1e-9
        assert out["batching"][proto]["throughput_rps_2_clients"] > 0 and out[f"{proto}_batching_speedup"] > 0
        assert out["batch_ceiling"][f"{proto}_batching_speedup_ceiling"] > 0
    floor = out["rest_json_floor"]
    assert floor["rest_p50_ratio_floor"] == pytest.approx(
        (out["in_process"]["p50_ms"] + floor["encode_decode_p50_ms"]) / out["in_process"]["p50_ms"])
    assert floor["rest_p50_ratio_floor"] > 1 and out["batch_ceiling"]["in_process_batch_speedup"] > 0
    post = out["postprocess_largest"]  # the segmenter (the default model) exported with --postprocess largest too
    assert post["ratio"] == pytest.approx(post["largest_p50_ms"] / post["none_p50_ms"]) and post["mask_components"] >= 1
    assert 0 < post["threshold"] < 1  # the untrained U-Net's median: a ragged mask whatever its initialisation


def test_optimizer_benchmark_times_keras_adamw_against_fused_adam_alternately():
    out = run_benchmark("optimizer.py", "--models", "unet", "--size", "32", "--batch", "2", "--steps", "1",
                        "--rounds", "2", "--precision", "float32")
    assert out["precision"] == "float32" and out["rounds"] == 2 and out["batch"] == {"unet": 2}
    runs = out["runs"]["unet"]
    assert set(runs) == {"keras_adamw", "fused_adam"} and all(len(r) == 2 for r in runs.values())
    assert runs["keras_adamw"][0]["trainable_variables"] == runs["fused_adam"][0]["trainable_variables"] > 0
    for name, r in runs.items():
        assert all(x["first_step_s"] > 0 and x["train_images_per_s"] > 0 for x in r)
        median = out["median"]["unet"][name]
        assert median["first_step_s"] == pytest.approx(sum(x["first_step_s"] for x in r) / 2, abs=1e-3)
    m, ratios = out["median"]["unet"], out["ratios"]["unet"]
    assert ratios["first_step_keras_over_fused"] == pytest.approx(
        m["keras_adamw"]["first_step_s"] / m["fused_adam"]["first_step_s"], rel=0.01)
    assert ratios["steady_speedup_fused_over_keras"] == pytest.approx(
        m["fused_adam"]["train_images_per_s"] / m["keras_adamw"]["train_images_per_s"], rel=0.01)


@pytest.mark.parametrize("flags, named", [(["--models", "unet,vgg16"], "'vgg16'"), (["--rounds", "0"], "--rounds")])
def test_optimizer_benchmark_refuses_bad_flags(flags, named):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "optimizer.py"), *flags], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and named in r.stderr and "Traceback" not in r.stderr
