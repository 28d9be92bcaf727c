"""`tf-bus serve`'s model config as TF Serving's ServerCore handles it: version labels
checked against loaded versions (and the flags that relax that), HandleReloadConfigRequest
over gRPC, and --model_config_file_poll_wait_seconds, on a real server on loopback over
half_plus_two SavedModels; SavedModel warmup (assets.extra/tf_serving_warmup_requests)
replayed at load time."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from serving_models import write_half_plus_two

from tf_bus.serving.client import GrpcClient, RestClient, ServingClientError
from tf_bus.serving.core import ServingError
from tf_bus.serving.server import ModelServer, ServerOptions

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_text(*models: tuple) -> str:
    """(name, base_path[, extra text]) per model -> a ModelServerConfig text proto."""
    body = "".join(f'  config {{ name: "{m[0]}" base_path: "{m[1]}" model_platform: "tensorflow" '
                   f'{m[2] if len(m) > 2 else ""} }}\n' for m in models)
    return "model_config_list {\n" + body + "}\n"


def parse(text: str):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())


def start(config_file: Path, **flags) -> ModelServer:
    flags = {"file_system_poll_wait_seconds": 0, **flags}
    opts = ServerOptions(port=0, rest_api_port=free_port(), rest_api_host="127.0.0.1", grpc_host="127.0.0.1",
                         model_config_file=str(config_file), **flags)
    srv = ModelServer(opts).start()
    assert srv.manager.wait_until_available(60)
    return srv


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("models")
    write_half_plus_two(base / "a" / "1")  # y = 0.5 x + 2
    write_half_plus_two(base / "b" / "1", b=3.0)  # y = 0.5 x + 3
    write_half_plus_two(base / "b" / "2", b=4.0)  # y = 0.5 x + 4
    return base


def y(client: GrpcClient, model: str, **spec) -> float:
    return client.predict(model, {"x": np.array([2.0], np.float32)}, **spec)["y"].tolist()[0]


# ------------------------------------------------------------------ labels at startup

def test_the_shipped_config_needs_the_label_flag_as_tensorflow_model_server_does(tmp_path):
    shipped = (REPO / "serving/models.config").read_text().replace("/models/", f"{tmp_path}/")
    (tmp_path / "models.config").write_text(shipped)
    opts = ServerOptions(model_config_file=str(tmp_path / "models.config"), rest_api_port=0)
    with pytest.raises(ValueError) as info:
        ModelServer(opts)
    assert ("Failed to start server. Error: FAILED_PRECONDITION: Request to assign label to version 1 of model "
            "busi_segmenter, which is not currently available for inference") in str(info.value)
    assert "--allow_version_labels_for_unavailable_models=true" in str(info.value)
    opts.allow_version_labels_for_unavailable_models = True
    assert ModelServer(opts).manager.model_names() == ["busi_classifier", "busi_segmenter"]


@pytest.mark.parametrize("text,message", [
    (config_text(("a", "/m/a"), ("a", "/m/b")), "Illegal to list model a multiple times in config list"),
    (config_text(("a", "models/a")), "Expected model a to have an absolute path or URI; got base_path()=models/a"),
    (config_text(("a", "/m/a")).replace('"tensorflow"', '"pytorch"'), "Model a requests unsupported platform pytorch"),
])
def test_a_startup_config_is_refused_in_tf_servings_words(tmp_path, text, message):
    (tmp_path / "models.config").write_text(text)
    with pytest.raises(ValueError, match="Failed to start server") as info:
        ModelServer(ServerOptions(model_config_file=str(tmp_path / "models.config"), rest_api_port=0))
    assert f"INVALID_ARGUMENT: {message}" in str(info.value)


# ------------------------------------------------------------------ HandleReloadConfigRequest

def test_reload_config_adds_removes_and_relabels_models_without_a_restart(models, tmp_path):
    (tmp_path / "models.config").write_text(config_text(("a", models / "a")))
    srv = start(tmp_path / "models.config")
    try:
        with GrpcClient(f"127.0.0.1:{srv.grpc_port}", retries=0) as c:
            assert y(c, "a") == 3.0
            # a new model, both versions, with labels on versions loaded by this very reload: refused
            # (labels are checked before anything loads), and nothing changed
            both = 'model_version_policy { all {} }'
            labelled = both + ' version_labels { key: "stable" value: 1 } version_labels { key: "canary" value: 2 }'
            with pytest.raises(ServingClientError) as info:
                c.reload_config(parse(config_text(("a", models / "a"), ("b", models / "b", labelled))))
            assert info.value.status == "FAILED_PRECONDITION"
            assert re.fullmatch("Request to assign label to version [12] of model b, which is not currently "
                                "available for inference", info.value.message), info.value.message
            assert srv.manager.model_names() == ["a"]
            # the model first, then its labels: TF Serving's two-step recipe
            resp = c.reload_config(parse(config_text(("a", models / "a"), ("b", models / "b", both))))
            assert (resp.status.error_code, resp.status.error_message) == (0, "")
            assert [(s.version, s.state) for s in c.status("b").model_version_status] == [(2, 30), (1, 30)]
            c.reload_config(parse(config_text(("a", models / "a"), ("b", models / "b", labelled))))
            assert (y(c, "b", label="stable"), y(c, "b", label="canary"), y(c, "b")) == (4.0, 5.0, 5.0)
            rest = RestClient(f"127.0.0.1:{srv.rest_port}", retries=0)
            assert rest.predict("b", instances=[2.0], label="stable") == {"predictions": [4.0]}
            # the same reload from a file, through the client
            (tmp_path / "only_b.config").write_text(config_text(("b", models / "b", labelled)))
            c.reload_config(tmp_path / "only_b.config")
            with pytest.raises(ValueError, match="missing.config: No such file or directory"):
                c.reload_config(tmp_path / "missing.config")  # named, before anything is sent
            assert srv.manager.model_names() == ["b"]
            with pytest.raises(ServingClientError) as info:
                y(c, "a")
            assert (info.value.status, info.value.message) == ("NOT_FOUND", "Servable not found for request: Latest(a)")
            assert [(s.version, s.state) for s in c.status("a").model_version_status] == [(1, 50)]  # END
            assert y(c, "b", label="stable") == 4.0  # kept models are not reloaded or interrupted
            # back again: a removed model can be re-added
            c.reload_config(parse(config_text(("a", models / "a"), ("b", models / "b", labelled))))
            assert y(c, "a") == 3.0 and srv.manager.status("a") == [(1, "AVAILABLE", "")]
    finally:
        srv.stop()


@pytest.mark.parametrize("change,code,message", [
    (lambda m: config_text(("a", m / "a"), ("a", m / "b")), "INVALID_ARGUMENT",
     "Illegal to list model a multiple times in config list"),
    (lambda m: config_text(("a", "relative/a")), "INVALID_ARGUMENT",
     "Expected model a to have an absolute path or URI; got base_path()=relative/a"),
    (lambda m: config_text(("a", m / "a", 'version_labels { key: "stable" value: 7 }')), "FAILED_PRECONDITION",
     "Request to assign label to version 7 of model a, which is not currently available for inference"),
    (lambda m: 'custom_model_config { type_url: "x" }', "INVALID_ARGUMENT",
     "ServerModelConfig type not supported by HandleReloadConfigRequest. Only ModelConfigList is currently supported"),
    (lambda m: "", "INVALID_ARGUMENT",
     "ServerModelConfig type not supported by HandleReloadConfigRequest. Only ModelConfigList is currently supported"),
    (lambda m: config_text(("a", m / "a"), ("c", m / "nowhere")), "UNKNOWN",
     "1 model(s) did not become available: {{{name: c} due to error: Could not find base path"),
])
def test_a_refused_reload_answers_tf_servings_status_and_keeps_serving(models, tmp_path, change, code, message):
    (tmp_path / "models.config").write_text(config_text(("a", models / "a")))
    srv = start(tmp_path / "models.config")
    try:
        with GrpcClient(f"127.0.0.1:{srv.grpc_port}", retries=0) as c:
            with pytest.raises(ServingClientError) as info:
                c.reload_config(parse(change(models)))
            assert info.value.status == code and info.value.message.startswith(message), info.value.message
            assert y(c, "a") == 3.0
    finally:
        srv.stop()


def test_label_flags_relax_the_check_as_in_tf_serving(models, tmp_path):
    def labels(**versions):
        extra = " ".join(f'version_labels {{ key: "{k}" value: {v} }}' for k, v in versions.items())
        return parse(config_text(("b", models / "b", "model_version_policy { specific { versions: 1 } } " + extra)))

    (tmp_path / "models.config").write_text(config_text(("b", models / "b", "model_version_policy { specific { "
                                                        'versions: 1 } } version_labels { key: "stable" value: 1 }')))
    srv = start(tmp_path / "models.config", allow_version_labels_for_unavailable_models=True)
    try:
        manager = srv.manager
        manager.reload_config(labels(stable=1, canary=2))  # a new label may name version 2, not loaded
        with pytest.raises(ServingClientError) as info, GrpcClient(f"127.0.0.1:{srv.grpc_port}", retries=0) as c:
            y(c, "b", label="canary")
        assert (info.value.status, info.value.message) == ("NOT_FOUND", "Servable not found for request: Specific(b, 2)")
        with pytest.raises(ValueError, match="Request to assign label to version 2 of model b"):
            manager.reload_config(labels(stable=2, canary=2))  # moving a label still needs its version loaded
        assert manager._labels == {"b": {"stable": 1, "canary": 2}}
    finally:
        srv.stop()
    (tmp_path / "models.config").write_text(config_text(("b", models / "b", "model_version_policy { specific { "
                                                        'versions: 1 } }')))
    srv = start(tmp_path / "models.config", force_allow_any_version_labels_for_unavailable_models=True)
    try:
        srv.manager.reload_config(labels(stable=1))
        srv.manager.reload_config(labels(stable=2))  # forced: moved to an unloaded version
        assert srv.manager._labels == {"b": {"stable": 2}}
    finally:
        srv.stop()


# ------------------------------------------------------------------ --model_config_file_poll_wait_seconds

def test_an_edited_config_file_is_applied_by_the_poller(models, tmp_path, caplog):
    from tf_bus.io import write_bytes_atomic

    config = tmp_path / "models.config"
    config.write_text(config_text(("a", models / "a")))
    srv = start(config, model_config_file_poll_wait_seconds=0.2, file_system_poll_wait_seconds=0.2)

    def wait_for(predicate, what):
        for _ in range(300):
            try:
                if predicate():
                    return
            except ServingError:  # NOT_FOUND before the model is known
                pass
            time.sleep(0.1)
        raise AssertionError(f"the poller did not {what}")

    def logged(text):
        return any(text in r.getMessage() for r in caplog.records)

    try:
        with caplog.at_level("INFO", logger="tf_bus.serving"), \
                GrpcClient(f"127.0.0.1:{srv.grpc_port}", retries=0) as c:
            write_bytes_atomic(config, config_text(("a", models / "a"), ("b", models / "b")).encode())
            wait_for(lambda: srv.manager.status("b")[0][:2] == (2, "AVAILABLE"), "add model b")
            assert srv.manager.model_names() == ["a", "b"] and y(c, "b") == 5.0
            config.write_text("model_config_list { config { name: ")  # a half-written edit is not applied
            wait_for(lambda: logged("Failed to read ModelServerConfig file"), "log the unreadable file")
            assert srv.manager.model_names() == ["a", "b"] and y(c, "a") == 3.0
            # A label on a version not exported yet: refused at each poll (model c keeps its old config);
            # applied once the version appears and the file system poller has loaded it.
            canary = tmp_path / "c"
            write_half_plus_two(canary / "1")
            write_bytes_atomic(config, config_text(("c", canary)).encode())
            wait_for(lambda: srv.manager.model_names() == ["c"] and srv.manager.status("c")[0][1] == "AVAILABLE",
                     "replace a and b by c")
            write_bytes_atomic(config, config_text(("c", canary, 'version_labels { key: "canary" value: 2 }')).encode())
            wait_for(lambda: logged("PollFilesystemAndReloadConfig failed to ReloadConfig: Request to assign label "
                                    "to version 2 of model c, which is not currently available for inference"),
                     "log the refused label")
            assert y(c, "c") == 3.0
            write_half_plus_two(tmp_path / "incoming", b=6.0)
            (tmp_path / "incoming").rename(canary / "2")
            wait_for(lambda: srv.manager.status("c", label="canary"), "apply the label once version 2 loaded")
            assert y(c, "c", label="canary") == 7.0
    finally:
        srv.stop()


# ------------------------------------------------------------------ SavedModel warmup

def warmup_records(*kinds: str) -> list[bytes]:
    """PredictionLog records of half_plus_two requests, one of each kind."""
    import tensorflow as tf
    from tensorflow_serving.apis import (classification_pb2, inference_pb2, predict_pb2, prediction_log_pb2,
                                         regression_pb2)

    def examples(input_proto):
        input_proto.example_list.examples.add().features.feature["x"].float_list.value.append(2.0)

    out = []
    for kind in kinds:
        log = prediction_log_pb2.PredictionLog()
        if kind == "predict":
            req = predict_pb2.PredictRequest()
            req.inputs["x"].CopyFrom(tf.make_tensor_proto([1.0, 2.0], dtype=tf.float32))
            log.predict_log.request.CopyFrom(req)
        elif kind == "predict_bad":
            log.predict_log.request.model_spec.signature_name = "nope"
        elif kind == "classify":
            req = classification_pb2.ClassificationRequest()
            req.model_spec.signature_name = "classify_x_to_y"
            examples(req.input)
            log.classify_log.request.CopyFrom(req)
        elif kind == "regress":
            req = regression_pb2.RegressionRequest()
            req.model_spec.signature_name = "regress_x_to_y"
            examples(req.input)
            log.regress_log.request.CopyFrom(req)
        elif kind == "multi":
            req = inference_pb2.MultiInferenceRequest()
            task = req.tasks.add()
            task.model_spec.name, task.model_spec.signature_name = "w", "regress_x_to_y"
            task.method_name = "tensorflow/serving/regress"
            examples(req.input)
            log.multi_inference_log.request.CopyFrom(req)
        elif kind == "session_run":
            log.session_run_log.SetInParent()
        out.append(log.SerializeToString())
    return out


def with_warmup(path: Path, records: list[bytes]) -> Path:
    import tensorflow as tf

    write_half_plus_two(path)
    (path / "assets.extra").mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(str(path / "assets.extra" / "tf_serving_warmup_requests")) as w:
        for r in records:
            w.write(r)
    return path


@pytest.mark.parametrize("records,flags,state,log_or_error", [
    (warmup_records("predict", "classify", "regress", "multi"), {"num_request_iterations_for_warmup": 2},
     "AVAILABLE", "Number of warmup records read: 4."),
    (warmup_records("predict"), {"enable_model_warmup": False}, "AVAILABLE", None),
    (warmup_records("predict", "predict_bad"), {}, "END",
     'record 2: Serving signature key "nope" not found.'),
    (warmup_records("session_run"), {}, "END", "Unsupported log_type for warmup: session_run_log"),
    (warmup_records("predict") * 1001, {}, "END", "Number of warmup records exceeds the maximum (1000) at "),
    ([b"not a PredictionLog"], {}, "END", "Failed to parse warmup record 1 from "),
])
def test_warmup_requests_are_replayed_before_a_version_serves(tmp_path, caplog, records, flags, state, log_or_error):
    flags = {"max_num_load_retries": 0, **flags}  # a failed load is final at once
    with_warmup(tmp_path / "w" / "1", records)
    (tmp_path / "models.config").write_text(config_text(("w", tmp_path / "w")))
    with caplog.at_level("INFO", logger="tf_bus.serving"):
        opts = ServerOptions(port=0, rest_api_port=0, grpc_host="127.0.0.1",
                             model_config_file=str(tmp_path / "models.config"), file_system_poll_wait_seconds=0,
                             **flags)
        srv = ModelServer(opts).start()
        srv.stop()
    ((version, got, error),) = srv.manager.status("w")
    assert (version, got) == (1, state), error
    logs = [r.getMessage() for r in caplog.records]
    warmed = [m for m in logs if m.startswith("Finished reading warmup data for model at ")]
    if state == "AVAILABLE":
        assert (log_or_error in warmed[0]) if log_or_error else not warmed, logs
    else:
        assert log_or_error in error and not warmed, error


# ------------------------------------------------------------------ --max_num_load_retries

def test_a_version_that_fails_to_load_is_retried_then_left_failed_until_it_comes_back(tmp_path, caplog):
    import shutil

    from tf_bus.serving.core import ModelManager, single_model_config

    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "saved_model.pb").write_bytes(b"not a SavedModel")
    manager = ModelManager(single_model_config("m", str(tmp_path / "m")), poll_seconds=0, max_load_retries=2,
                           load_retry_interval=0)
    slow = ModelManager(single_model_config("m", str(tmp_path / "m")), poll_seconds=0, max_load_retries=2,
                        load_retry_interval=60)

    def failed_loads():
        return sum(r.getMessage().startswith("Loading servable: {name: m version: 1} failed: DecodeError")
                   for r in caplog.records)

    with caplog.at_level("INFO", logger="tf_bus.serving"):
        manager.poll_once()
        assert manager.status("m") == [(1, "LOADING", "")] and failed_loads() == 1
        manager.poll_once()
        manager.poll_once()
        ((version, state, error),) = manager.status("m")
        assert (version, state) == (1, "END") and "Error parsing message" in error
        messages = [r.getMessage() for r in caplog.records]
        assert "Retrying of Loading servable: {name: m version: 1} retry: 2" in messages
        assert "Retrying of Loading servable: {name: m version: 1} exhausted max_num_retries: 2" in messages
        for _ in range(3):
            manager.poll_once()
        assert failed_loads() == 3, "not tried again after the retries are spent"
        t0 = time.monotonic()
        assert manager.wait_until_available(30) is False and time.monotonic() - t0 < 5
        slow.poll_once()
        slow.poll_once()
        assert failed_loads() == 4, "the next try waits for the retry interval"
        shutil.rmtree(tmp_path / "m" / "1")
        manager.poll_once()  # gone: its failures are forgotten
        write_half_plus_two(tmp_path / "m" / "1")
        manager.poll_once()
    assert manager.status("m") == [(1, "AVAILABLE", "")] and manager.wait_until_available(1)


def test_grpc_also_on_a_unix_socket(models, tmp_path):
    (tmp_path / "models.config").write_text(config_text(("a", models / "a")))
    sock = tmp_path / "grpc.sock"
    srv = start(tmp_path / "models.config", grpc_socket_path=str(sock))
    try:
        with GrpcClient(f"unix:{sock}", retries=0) as c:
            assert y(c, "a") == 3.0
        with GrpcClient(f"127.0.0.1:{srv.grpc_port}", retries=0) as c:
            assert y(c, "a") == 3.0  # and on the TCP port as before
    finally:
        srv.stop()
    with pytest.raises(OSError, match="--grpc_socket_path /nonexistent/dir/grpc.sock: cannot listen there"):
        start(tmp_path / "models.config", grpc_socket_path="/nonexistent/dir/grpc.sock")
