"""The shipped TF Serving configs (parsed with TF Serving's protos), docker-compose, and
`tf-bus serve` / `tf-bus predict` as processes (graceful SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format

from tf_bus.export import export_run

REPO = Path(__file__).resolve().parents[1]


def test_serving_configs_parse_with_tf_servings_protos():
    from tensorflow_serving.config import model_server_config_pb2

    from tf_bus.serving.protos import batching_parameters_pb2, monitoring_config_pb2

    models = text_format.Parse((REPO / "serving/models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    names = {c.name: c for c in models.model_config_list.config}
    assert set(names) == {"busi_segmenter", "busi_classifier"}
    for c in names.values():
        assert c.model_platform == "tensorflow" and c.base_path == f"/models/{c.name}"
        assert c.model_version_policy.latest.num_versions == 2 and c.version_labels["stable"] == 1
    b = text_format.Parse((REPO / "serving/batching_parameters.txt").read_text(), batching_parameters_pb2.BatchingParameters())
    assert b.max_batch_size.value == 16 and b.batch_timeout_micros.value == 2000 and b.num_batch_threads.value == 2
    m = text_format.Parse((REPO / "serving/monitoring.config").read_text(), monitoring_config_pb2.MonitoringConfig())
    assert m.prometheus_config.enable and m.prometheus_config.path == "/monitoring/prometheus/metrics"
    with pytest.raises(text_format.ParseError):  # a typo is caught
        text_format.Parse("max_batch_sise { value: 16 }", batching_parameters_pb2.BatchingParameters())


def test_docker_compose_runs_the_official_image_over_these_configs():
    compose = yaml.safe_load((REPO / "docker/docker-compose.yml").read_text())
    serving = compose["services"]["serving"]
    assert serving["image"].startswith("tensorflow/serving:")
    assert set(serving["ports"]) == {"8500:8500", "8501:8501"}
    flags = dict(f.lstrip("-").split("=", 1) if "=" in f else (f.lstrip("-"), True) for f in serving["command"])
    mounts = {v.split(":")[1]: v.split(":")[0] for v in serving["volumes"]}  # container -> host
    assert mounts["/config"] == "../serving" and mounts["/models"] == "../models"
    for flag in ("model_config_file", "batching_parameters_file", "monitoring_config_file"):
        assert (REPO / "serving" / Path(flags[flag]).name).is_file(), flag
    assert flags["enable_batching"] is True and flags["port"] == "8500" and flags["rest_api_port"] == "8501"
    # models.config labels versions, which tensorflow_model_server refuses at startup without this
    assert "version_labels" in (REPO / "serving/models.config").read_text()
    assert flags["allow_version_labels_for_unavailable_models"] == "true"
    assert "minio" in compose["services"] and (REPO / "docker/Dockerfile").is_file()


def test_docker_compose_minio_is_what_the_stage_commands_are_pointed_at():
    compose = yaml.safe_load((REPO / "docker/docker-compose.yml").read_text())
    minio, setup, train = (compose["services"][k] for k in ("minio", "minio-setup", "train"))
    assert "9000:9000" in minio["ports"]
    env = train["environment"]
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        minio["environment"]["MINIO_ROOT_USER"], minio["environment"]["MINIO_ROOT_PASSWORD"])
    assert "local/busi" in setup["command"][0] and setup["depends_on"]["minio"]["condition"] == "service_healthy"


@pytest.mark.parametrize("argv,expected", [
    ([], (False, False, 0.0)),
    (["--enable_batching", "--allow_version_labels_for_unavailable_models"], (True, True, 0.0)),
    (["--enable_batching=false", "--allow_version_labels_for_unavailable_models=true",
      "--model_config_file_poll_wait_seconds=60"], (False, True, 60.0)),
    (["--enable_batching=1", "--allow_version_labels_for_unavailable_models=0"], (True, False, 0.0)),
])
def test_serve_reads_boolean_flags_as_tensorflow_model_server(argv, expected):
    from tf_bus.cli import build_parser

    args = build_parser().parse_args(["serve", *argv])
    assert (args.enable_batching, args.allow_version_labels_for_unavailable_models,
            args.model_config_file_poll_wait_seconds) == expected


def test_serve_refuses_a_boolean_flag_it_cannot_read(capsys):
    from tf_bus.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--enable_batching=yes please"])
    assert "'yes please' is not a boolean; give true or false" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_and_predict_processes(tiny_runs, tmp_path):
    base = tmp_path / "models"
    export_run(tiny_runs["classifier"], base, "busi_classifier")
    export_run(tiny_runs["segmenter"], base, "busi_segmenter", threshold=0.5)
    # The shipped config, pointed at this folder instead of the container's /models.
    config = tmp_path / "models.config"
    config.write_text((REPO / "serving/models.config").read_text().replace("/models/", f"{base}/"))
    ports = []
    for _ in range(2):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    ready = tmp_path / "ready"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    server = subprocess.Popen(
        [sys.executable, "-m", "tf_bus.cli", "serve", "--port", str(ports[0]), "--rest_api_port", str(ports[1]),
         "--host", "127.0.0.1", "--model_config_file", str(config), "--enable_batching",
         "--allow_version_labels_for_unavailable_models=true",
         "--batching_parameters_file", str(REPO / "serving/batching_parameters.txt"),
         "--monitoring_config_file", str(REPO / "serving/monitoring.config"), "--ready_file", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for _ in range(600):
            if ready.exists() or server.poll() is not None:
                break
            time.sleep(0.2)
        assert ready.exists(), server.communicate(timeout=10)[0][-3000:]
        from PIL import Image

        img = tmp_path / "case 1.png"
        Image.new("L", (48, 40), 128).save(img)
        for protocol, port in (("grpc", ports[0]), ("rest", ports[1])):
            r = subprocess.run([sys.executable, "-m", "tf_bus.cli", "predict", str(img), "--server", f"127.0.0.1:{port}",
                                "--protocol", protocol, "--model", "busi_classifier", "--label", "stable"],
                               capture_output=True, text=True, timeout=120, env=env)
            assert r.returncode == 0, r.stderr
            line = json.loads(r.stdout.strip().splitlines()[-1])
            assert line["class"] in ("benign", "malignant", "normal")
            assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
            out = tmp_path / f"pred_{protocol}"
            r = subprocess.run([sys.executable, "-m", "tf_bus.cli", "predict", str(img), "--server", f"127.0.0.1:{port}",
                                "--protocol", protocol, "--model", "busi_segmenter", "--out", str(out)],
                               capture_output=True, text=True, timeout=120, env=env)
            assert r.returncode == 0, r.stderr
            line = json.loads(r.stdout.strip().splitlines()[-1])
            assert Image.open(line["mask"]).size == (48, 40) and Image.open(line["overlay"]).size == (48, 40)
        # A folder: its images in natural order, its masks left out, two requests of at most 2 images.
        folder = tmp_path / "benign"
        folder.mkdir()
        for i in (10, 2, 1):
            Image.new("L", (40, 30 + i), 100 + i).save(folder / f"benign ({i}).png")
            Image.new("L", (40, 30 + i), 0).save(folder / f"benign ({i})_mask.png")

        def requests_counted():
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/monitoring/prometheus/metrics").read()
            return sum(int(line.rsplit(" ", 1)[1]) for line in metrics.decode().splitlines()
                       if line.startswith(':tensorflow:serving:request_count{protocol="rest",model_name="busi_classifier"'))

        before = requests_counted()
        r = subprocess.run([sys.executable, "-m", "tf_bus.cli", "predict", str(folder), "--batch-size", "2",
                            "--server", f"127.0.0.1:{ports[1]}", "--protocol", "rest", "--model", "busi_classifier"],
                           capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr
        lines = [json.loads(line) for line in r.stdout.strip().splitlines()]
        assert [Path(line["image"]).name for line in lines] == ["benign (1).png", "benign (2).png", "benign (10).png"]
        assert requests_counted() - before == 2
        r = subprocess.run([sys.executable, "-m", "tf_bus.cli", "predict", str(img), "--server", f"127.0.0.1:{ports[1]}",
                            "--protocol", "rest", "--model", "nope"], capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 2 and "404: Servable not found for request: Latest(nope)" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=60)[0]
    assert server.returncode == 0, output[-3000:]
    assert "shutting down" in output


@pytest.mark.slow
def test_predict_a_run_without_a_server(tiny_runs, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in (1, 2):
        Image.new("L", (44, 36), 60 * i).save(folder / f"case {i}.png")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

    def predict(*args):
        return subprocess.run([sys.executable, "-m", "tf_bus.cli", "predict", *map(str, args)], capture_output=True,
                              text=True, timeout=300, env=env)

    r = predict(folder, "--run", tiny_runs["segmenter"], "--out", tmp_path / "masks", "--batch-size", "1")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert [Path(line["image"]).name for line in lines] == ["case 1.png", "case 2.png"]
    for line in lines:
        assert Image.open(line["mask"]).size == (44, 36) and 0 <= line["lesion_area_fraction"] <= 1
    (folder / "notes.png").write_text("not an image")
    from tf_bus.cli import main

    for args, message in [  # in this process: the same main() as the console script, without its start-up
        ((folder, "--run", tiny_runs["classifier"]), "notes.png: cannot be read as an image"),
        ((folder,), "pass one of --model NAME (a served model) or --run RUN_DIR"),
        ((folder, "--run", tiny_runs["classifier"], "--model", "m"), "pass one of --model NAME"),
        ((folder, "--run", tmp_path), "config.json: missing"),
        ((folder, "--run", tiny_runs["classifier"], "--label", "stable"), "leave them out with --run"),
    ]:
        assert main(["predict", *map(str, args)]) == 2
        assert message in capsys.readouterr().err
