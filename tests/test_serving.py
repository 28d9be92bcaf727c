"""`tf-bus serve` on loopback: TF Serving's REST and gRPC wire behaviour against
half_plus_two (a model tf-bus did not make) and exported tf-bus models."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from serving_models import write_half_plus_two

from tf_bus.export import export_run
from tf_bus.serving.client import GrpcClient, RestClient, ServingClientError, predict_images
from tf_bus.serving.server import ModelServer, ServerOptions

pytestmark = pytest.mark.slow

CONFIG = """
model_config_list {{
  config {{
    name: "hp"
    base_path: "{base}/hp"
    model_platform: "tensorflow"
    model_version_policy {{ specific {{ versions: 123 versions: 124 }} }}
    version_labels {{ key: "stable" value: 123 }}
    version_labels {{ key: "canary" value: 124 }}
  }}
  config {{ name: "busi_classifier" base_path: "{base}/busi_classifier" model_platform: "tensorflow" }}
  config {{ name: "busi_segmenter" base_path: "{base}/busi_segmenter" model_platform: "tensorflow" }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(shape, seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_runs):
    base = tmp_path_factory.mktemp("models")
    write_half_plus_two(base / "hp" / "123")
    write_half_plus_two(base / "hp" / "124", b=3.0)
    export_run(tiny_runs["classifier"], base, "busi_classifier")
    export_run(tiny_runs["segmenter"], base, "busi_segmenter", threshold=0.5)
    (base / "models.config").write_text(CONFIG.format(base=base))
    (base / "monitoring.config").write_text('prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }')
    return base


@pytest.fixture(scope="module")
def server(base):
    opts = ServerOptions(port=0, rest_api_port=free_port(), rest_api_host="127.0.0.1", grpc_host="127.0.0.1",
                         model_config_file=str(base / "models.config"), file_system_poll_wait_seconds=0,
                         allow_version_labels_for_unavailable_models=True,
                         monitoring_config_file=str(base / "monitoring.config"), rest_api_max_body_bytes=1 << 20)
    srv = ModelServer(opts).start()
    assert srv.manager.wait_until_available(120)
    yield srv
    srv.stop()


def rest(server, method, path, body=None):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers["Content-Type"], json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], json.loads(e.read())


# ------------------------------------------------------------------ REST, as in TF Serving's handler tests

@pytest.mark.parametrize("path,body,expected", [
    ("/v1/models/hp:predict", {"instances": [[1.0, 2.0], [3.0, 4.0]]}, {"predictions": [[3.5, 4.0], [4.5, 5.0]]}),
    ("/v1/models/hp/versions/123:predict", {"instances": [1.0, 2.0]}, {"predictions": [2.5, 3.0]}),
    ("/v1/models/hp/labels/stable:predict", {"instances": [1.0, 2.0]}, {"predictions": [2.5, 3.0]}),
    ("/v1/models/hp/labels/canary:predict", {"instances": [1.0, 2.0]}, {"predictions": [3.5, 4.0]}),
    ("/v1/models/hp/versions/123:predict", {"signature_name": "serving_default", "instances": [3.0, 4.0]},
     {"predictions": [3.5, 4.0]}),
    ("/v1/models/hp/versions/123:predict", {"signature_name": "serving_default", "inputs": [3.0, 4.0]},
     {"outputs": [3.5, 4.0]}),
    ("/v1/models/hp/versions/123:predict", {"inputs": {"x": [[1.5], [0.1]]}}, {"outputs": [[2.75], [2.05]]}),
    ("/v1/models/hp/versions/123:predict", {"instances": [{"x": 1.0}, {"x": 2.0}]}, {"predictions": [2.5, 3.0]}),
    ("/v1/models/hp/versions/123:regress", {"signature_name": "regress_x_to_y", "examples": [{"x": 80.0}]},
     {"results": [42.0]}),
    ("/v1/models/hp/labels/stable:regress", {"signature_name": "regress_x2_to_y3", "examples": [{"x2": 4.0}]},
     {"results": [5.0]}),
    ("/v1/models/hp/versions/123:classify", {"signature_name": "classify_x_to_y", "examples": [{"x": 20.0}]},
     {"results": [[["", 12.0]]]}),
    ("/v1/models/hp/labels/stable:classify",
     {"signature_name": "classify_x_to_y", "context": {"x2": 1.0}, "examples": [{"x": 10.0}, {"x": 2.0}]},
     {"results": [[["", 7.0]], [["", 3.0]]]}),
])
def test_rest_predict_classify_regress(server, path, body, expected):
    status, ctype, doc = rest(server, "POST", path, body)
    assert (status, ctype) == (200, "application/json"), doc
    assert doc == expected


def test_rest_status_and_metadata(server):
    expected = {"model_version_status": [{"version": "123", "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}]}
    for path in ("/v1/models/hp/versions/123", "/v1/models/hp/labels/stable"):
        assert rest(server, "GET", path) == (200, "application/json", expected)
    status, _, doc = rest(server, "GET", "/v1/models/hp")
    assert status == 200 and [s["version"] for s in doc["model_version_status"]] == ["124", "123"]
    status, _, meta = rest(server, "GET", "/v1/models/hp/versions/123/metadata")
    assert status == 200 and meta["model_spec"] == {"name": "hp", "signature_name": "", "version": "123"}
    sigs = meta["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "classify_x_to_y", "regress_x_to_y", "regress_x2_to_y3"} <= set(sigs)
    assert sigs["classify_x_to_y"]["method_name"] == "tensorflow/serving/classify"
    assert sigs["serving_default"]["inputs"]["x"]["dtype"] == "DT_FLOAT"
    status, _, meta = rest(server, "GET", "/v1/models/busi_classifier/metadata")
    assert meta["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]["images"]["dtype"] == "DT_STRING"


BAD = [
    ("GET", "/v1/foo", None, 400, "Malformed request: GET /v1/foo"),
    ("POST", "/v1/foo", b"", 400, "Malformed request"),
    ("GET", "/v1/models", None, 400, "Missing model name in request."),
    ("GET", "/v1/models/debug/model_name", None, 400, "Malformed request"),
    ("GET", "/v1/models/hp:predict", None, 400, "Malformed request"),
    ("POST", "/v1/models/hp/versions/HELLO:regress", b"", 400, "Malformed request"),
    ("POST", "/v1/models/hp/versions/18446744073709551615:regress", b"{}", 400, "Failed to convert version"),
    ("POST", "/v1/models/hp/metadata", b"", 400, "Malformed request"),
    ("POST", "/v1/models/foo:predict", {"instances": [1]}, 404, "Servable not found for request: Latest(foo)"),
    ("POST", "/v1/models/foo/versions/50:predict", {"instances": [1]}, 404, "Servable not found for request: Specific(foo, 50)"),
    ("POST", "/v1/models/hp/versions/99:predict", {"instances": [1]}, 404, "Servable not found for request: Specific(hp, 99)"),
    ("GET", "/v1/models/hp/versions/99", None, 404, "Could not find version 99 of model hp"),
    ("GET", "/v1/models/nope", None, 404, "Could not find any versions of model nope"),
    ("POST", "/v1/models/hp/labels/Version_Nonexistent:predict", {"instances": ["x"]}, 400,
     "Unrecognized servable version label: Version_Nonexistent"),
    ("POST", "/v1/models/..%2F..%2Fetc%2Fpasswd:predict", {"instances": [1]}, 404, "Servable not found"),
    ("POST", "/v1/models/hp:predict", b"", 400, "JSON Parse error: The document is empty"),
    ("POST", "/v1/models/hp:predict", b"instances = [1, 2]", 400, "JSON Parse error: Invalid value"),
    ("POST", "/v1/models/hp:predict", b"[1, 2]", 400, "Is not object"),
    ("POST", "/v1/models/hp:predict", {"instances": ["x", "y"]}, 400, "not of expected type: float"),
    ("POST", "/v1/models/hp:predict", {"signature_name": 100}, 400, "'signature_name' key must be a string value."),
    ("POST", "/v1/models/hp:predict", {"signature_name": "nope", "instances": [1.0]}, 400,
     'Serving signature name: "nope" not found in signature def'),
    ("POST", "/v1/models/hp:predict", {"instances": [[1.0, 2.0], [3.0]]}, 400, "Expecting tensor size: 2 but got: 1"),
    ("POST", "/v1/models/hp:predict", {"instances": [[1.0, [2.0]]]}, 400, "Encountered list at unexpected level: 1"),
    ("POST", "/v1/models/hp:predict", {"instances": [[[1.0], 2.0]]}, 400, "found at incorrect level: 2"),
    ("POST", "/v1/models/hp:predict", {"instances": []}, 400, "No values in 'instances' array"),
    ("POST", "/v1/models/hp:predict", {"instances": 1}, 400, "Excepting 'instances' to be an list/array"),
    ("POST", "/v1/models/hp:predict", {"instances": [1.0], "inputs": [1.0]}, 400, "expecting only one of 'inputs' or 'instances'"),
    ("POST", "/v1/models/hp:predict", {"foo": 1}, 400, "Missing 'inputs' or 'instances' key"),
    ("POST", "/v1/models/hp:predict", {"instances": [1e300]}, 400, "without loss of precision"),
    ("POST", "/v1/models/hp:regress", {"signature_name": "regress_x_to_y"}, 400, "key 'examples' is expected"),
    ("POST", "/v1/models/hp:regress", {"signature_name": "serving_default", "examples": [{"x": 1.0}]}, 400,
     "Expected regression signature method_name to be tensorflow/serving/regress"),
    ("POST", "/v1/models/busi_classifier:predict", {"instances": [{"b64": "not base64!"}]}, 400, "Unable to base64 decode"),
    ("POST", "/v1/models/busi_classifier:predict", {"instances": [{"b64": base64.b64encode(b"no image").decode()}]},
     400, "Unknown image file format"),
    ("POST", "/v1/models/busi_classifier:predict", {"instances": [3.0]}, 400, "is not of expected type: string"),
]


@pytest.mark.parametrize("method,path,body,code,message", BAD)
def test_rest_errors_are_tf_servings_and_the_server_keeps_serving(server, method, path, body, code, message):
    status, ctype, doc = rest(server, method, path, body)
    assert (status, ctype) == (code, "application/json"), doc
    assert message in doc["error"], doc
    assert rest(server, "POST", "/v1/models/hp/versions/123:predict", {"instances": [1.0]})[2] == {"predictions": [2.5]}


def test_oversized_body_is_refused(server):
    status, _, doc = rest(server, "POST", "/v1/models/hp:predict", b"{" + b" " * (2 << 20) + b"}")
    assert status == 413 and "exceeds the limit" in doc["error"]
    assert rest(server, "GET", "/v1/models/hp/versions/123")[0] == 200


# ------------------------------------------------------------------ gRPC

def test_grpc_predict_classify_regress_metadata_status(server):
    from tensorflow_serving.apis import get_model_metadata_pb2

    with GrpcClient(f"127.0.0.1:{server.grpc_port}") as c:
        out = c.predict("hp", {"x": np.array([1.0, 2.0, 5.0], np.float32)}, label="stable")
        np.testing.assert_allclose(out["y"], [2.5, 3.0, 4.5])
        assert c.predict("hp", {"x": np.array([1.0], np.float32)})["y"].tolist() == [3.5]  # latest is 124
        reg = c.regress("hp", [{"x": 80.0}], signature_name="regress_x_to_y", version=123)
        assert [r.value for r in reg.regressions] == [42.0]
        cls = c.classify("hp", [{"x": 20.0}], signature_name="classify_x_to_y", version=123)
        assert [(k.label, k.score) for k in cls.classifications[0].classes] == [("", 12.0)]
        meta = c.metadata("hp", version=123)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        meta.metadata["signature_def"].Unpack(sig_map)
        assert sig_map.signature_def["regress_x_to_y"].method_name == "tensorflow/serving/regress"
        st = c.status("hp")
        assert sorted(s.version for s in st.model_version_status) == [123, 124]
        assert all(s.state == 30 for s in st.model_version_status)  # AVAILABLE


@pytest.mark.parametrize("call,code,message", [
    (lambda c: c.predict("nope", {"x": np.zeros(1, np.float32)}), "NOT_FOUND", "Servable not found for request: Latest(nope)"),
    (lambda c: c.predict("hp", {"x": np.zeros(1, np.float32)}, version=7), "NOT_FOUND", "Specific(hp, 7)"),
    (lambda c: c.predict("hp", {"x": np.zeros(1, np.float32)}, label="nope"), "INVALID_ARGUMENT", "Unrecognized servable version label: nope"),
    (lambda c: c.predict("hp", {"x": np.array([b"a"], dtype=object)}), "INVALID_ARGUMENT", "Expects arg[0] to be float but string is provided"),
    (lambda c: c.predict("hp", {"z": np.zeros(1, np.float32)}), "INVALID_ARGUMENT", "input size does not match signature"),
    (lambda c: c.predict("hp", {"x": np.zeros(1, np.float32)}, signature_name="nope"), "INVALID_ARGUMENT", 'Serving signature key "nope" not found.'),
    (lambda c: c.predict("hp", {"x": np.zeros(1, np.float32)}, output_filter=["q"]), "INVALID_ARGUMENT", "output tensor alias not found in signature: q"),
    (lambda c: c.status("nope"), "NOT_FOUND", "Could not find any versions of model nope"),
    (lambda c: c.predict("busi_classifier", {"images": np.array([b"not an image"], dtype=object)}), "INVALID_ARGUMENT", "Unknown image file format"),
])
def test_grpc_errors_carry_tf_servings_codes(server, call, code, message):
    with GrpcClient(f"127.0.0.1:{server.grpc_port}", retries=0) as c:
        with pytest.raises(ServingClientError) as info:
            call(c)
        assert info.value.status == code and message in info.value.message, info.value
        assert c.predict("hp", {"x": np.array([1.0], np.float32)}, version=123)["y"].tolist() == [2.5]


def test_grpc_multi_inference_runs_classify_and_regress_tasks_on_one_input(server):
    with GrpcClient(f"127.0.0.1:{server.grpc_port}", retries=0) as c:
        resp = c.multi_inference("hp", [{"x": 2.0, "x2": 4.0}, {"x": 10.0}], [
            ("regress_x_to_y", "regress"), ("classify_x_to_y", "classify"), ("regress_x2_to_y3", "regress")],
            label="stable")
    regress_y, classify_y, regress_y3 = resp.results
    assert [r.value for r in regress_y.regression_result.regressions] == [3.0, 7.0]
    assert [[k.score for k in cl.classes] for cl in classify_y.classification_result.classifications] == [[3.0], [7.0]]
    assert [r.value for r in regress_y3.regression_result.regressions] == [5.0, 3.0]  # x2 defaults to 0
    assert [(r.model_spec.name, r.model_spec.signature_name, r.model_spec.version.value) for r in resp.results] == [
        ("hp", "regress_x_to_y", 123), ("hp", "classify_x_to_y", 123), ("hp", "regress_x2_to_y3", 123)]


REGRESS, CLASSIFY, PREDICT = "tensorflow/serving/regress", "tensorflow/serving/classify", "tensorflow/serving/predict"


@pytest.mark.parametrize("tasks,with_input,code,message", [  # TF Serving's multi_inference_test cases
    ([], True, "INVALID_ARGUMENT", "Expected at least one task"),
    ([("nope", "regress_x_to_y", REGRESS)], True, "NOT_FOUND", "Servable not found for request: Latest(nope)"),
    ([("hp", "regress_x_to_y", REGRESS)], False, "INVALID_ARGUMENT", "Input is empty."),
    ([("hp", "nope", REGRESS)], True, "INVALID_ARGUMENT", "Requested signature not found in model graph: nope"),
    ([("hp", "regress_x_to_y", REGRESS), ("busi_classifier", "regress_x_to_y", REGRESS)], True, "INVALID_ARGUMENT",
     "All ModelSpecs in a MultiInferenceRequest must access the same model name."),
    ([("hp", "regress_x_to_y", REGRESS), ("hp", "regress_x_to_y", REGRESS)], True, "INVALID_ARGUMENT",
     "Duplicate evaluation of signature: regress_x_to_y"),
    ([("hp", "serving_default", PREDICT)], True, "UNIMPLEMENTED",
     "Unsupported signature method_name: tensorflow/serving/predict"),
    ([("hp", "regress_x_to_y", CLASSIFY)], True, "INVALID_ARGUMENT",
     "Expected classification signature method_name to be tensorflow/serving/classify. Was: tensorflow/serving/regress"),
])
def test_grpc_multi_inference_errors_are_tf_servings(server, tasks, with_input, code, message):
    import grpc
    from tensorflow_serving.apis import inference_pb2

    req = inference_pb2.MultiInferenceRequest()
    for model, signature_name, method in tasks:
        task = req.tasks.add()
        task.model_spec.name, task.model_spec.signature_name, task.method_name = model, signature_name, method
    if with_input:
        req.input.example_list.examples.add().features.feature["x"].float_list.value.append(2.0)
    with GrpcClient(f"127.0.0.1:{server.grpc_port}", retries=0) as c:
        with pytest.raises(grpc.RpcError) as info:
            c.predictions.MultiInference(req, timeout=30)
        assert (info.value.code().name, info.value.details()) == (code, message)


def test_multi_inference_refuses_signatures_with_different_inputs(tmp_path):
    from serving_models import write_two_inputs
    from tensorflow_serving.apis import inference_pb2

    from tf_bus.serving import service
    from tf_bus.serving.core import ModelManager, ServingError, single_model_config

    write_two_inputs(tmp_path / "two" / "1")
    manager = ModelManager(single_model_config("two", str(tmp_path / "two")), poll_seconds=0)
    manager.start()
    req = inference_pb2.MultiInferenceRequest()
    req.input.example_list.examples.add().features.feature["x"].float_list.value.append(2.0)
    for name in ("regress_a", "regress_b"):
        task = req.tasks.add()
        task.model_spec.name, task.model_spec.signature_name, task.method_name = "two", name, REGRESS
    with pytest.raises(ServingError, match="^Input tensor must be the same for all Signatures.$"):
        service.multi_inference(manager.resolve, req)
    del req.tasks[1]
    assert service.multi_inference(manager.resolve, req).results[0].regression_result.regressions[0].value == 2.0


# ------------------------------------------------------------------ tf-bus models over both protocols

def test_tf_bus_models_answer_the_same_over_rest_grpc_and_in_process(server, base):
    images = [png((40, 56), 1), png((36, 36, 3), 2)]
    local = tf.saved_model.load(str(base / "busi_classifier" / "1")).signatures["serving_default"]
    expected = local(images=tf.constant(images))["probabilities"].numpy()
    for protocol, port in (("grpc", server.grpc_port), ("rest", server.rest_port)):
        out = predict_images(images, "busi_classifier", server=f"127.0.0.1:{port}", protocol=protocol)
        np.testing.assert_allclose(out["probabilities"], expected, atol=1e-6)
        assert [n.decode() for n in out["class_names"]] == [("benign", "malignant", "normal")[i] for i in expected.argmax(1)]
    seg = tf.saved_model.load(str(base / "busi_segmenter" / "1")).signatures["serving_default"]
    want = seg(images=tf.constant(images))
    for protocol, port in (("grpc", server.grpc_port), ("rest", server.rest_port)):
        out = predict_images(images, "busi_segmenter", server=f"127.0.0.1:{port}", protocol=protocol)
        assert list(out["mask_png_bytes"]) == list(want["mask_png_bytes"].numpy())
        np.testing.assert_allclose(out["mask_probabilities"], want["mask_probabilities"].numpy(), atol=1e-6)


@pytest.mark.parametrize("kind, model", [("classifier", "busi_classifier"), ("segmenter", "busi_segmenter")])
def test_a_run_predicted_in_process_answers_as_its_served_export(kind, model, server, tiny_runs):
    from tf_bus.export import local_predictor

    images = [png((40, 56), 3), png((36, 36, 3), 4), png((20, 30), 5)]
    got_kind, local = local_predictor(tiny_runs[kind])
    mine = local(images)
    served = predict_images(images, model, server=f"127.0.0.1:{server.grpc_port}", protocol="grpc")
    assert got_kind == kind and sorted(mine) == sorted(served)
    for name, value in served.items():
        if value.dtype == object:  # class names, mask PNGs
            assert list(mine[name]) == list(value), name
        else:
            np.testing.assert_allclose(mine[name], value, atol=1e-6, err_msg=name)


def test_prometheus_metrics(server):
    rest(server, "POST", "/v1/models/hp/versions/123:predict", {"instances": [1.0]})
    with urllib.request.urlopen(f"http://127.0.0.1:{server.rest_port}/monitoring/prometheus/metrics", timeout=30) as r:
        text = r.read().decode()
    assert ':tensorflow:serving:request_count{protocol="rest",model_name="hp",API="predict",status="200"}' in text
    assert ":tensorflow:serving:request_latency_bucket" in text


# ------------------------------------------------------------------ lifecycle and batching

def test_new_version_is_loaded_and_old_unloaded_without_failing_requests(tiny_runs, tmp_path):
    base = tmp_path / "models"
    export_run(tiny_runs["classifier"], base, "cls")
    opts = ServerOptions(port=0, rest_api_port=free_port(), rest_api_host="127.0.0.1", grpc_host="127.0.0.1",
                         model_name="cls", model_base_path=str(base / "cls"), file_system_poll_wait_seconds=0.2)
    srv = ModelServer(opts).start()
    assert srv.manager.wait_until_available(120)
    image = png((32, 32))
    errors, versions, stop = [], set(), threading.Event()

    def hammer(protocol):
        port = srv.grpc_port if protocol == "grpc" else srv.rest_port
        while not stop.is_set():
            try:
                predict_images([image], "cls", server=f"127.0.0.1:{port}", protocol=protocol)
                versions.add(srv.manager.resolve("cls").version)
            except Exception as e:  # any failure is a test failure
                errors.append(repr(e))

    threads = [threading.Thread(target=hammer, args=(p,)) for p in ("grpc", "rest", "grpc", "rest")]
    try:
        for t in threads:
            t.start()
        shutil.copytree(base / "cls" / "1", base / "cls" / ".incoming")
        (base / "cls" / ".incoming").rename(base / "cls" / "2")  # appears atomically, as export writes it
        for _ in range(600):
            if srv.manager.status("cls")[0][:2] == (2, "AVAILABLE") and 1 not in srv.manager._models["cls"].loaded:
                break
            stop.wait(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join()
        srv.stop()
    assert not errors, errors[:3]
    assert [(v, s) for v, s, _ in srv.manager.status("cls")] == [(2, "AVAILABLE"), (1, "END")]
    assert 2 in versions


def test_a_base_path_without_versions_is_warned_about_once_in_tf_servings_words(tmp_path, caplog):
    from tf_bus.serving.core import ModelManager, single_model_config

    base = tmp_path / "m"
    manager = ModelManager(single_model_config("m", str(base)), poll_seconds=0)

    def warnings_after_polls(n=3):
        caplog.clear()
        for _ in range(n):
            manager.poll_once()
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    with caplog.at_level("WARNING", logger="tf_bus.serving"):
        assert warnings_after_polls() == [f"Could not find base path {base} for servable m with error NOT_FOUND: "
                                          f"{base} not found"]
        (base / "1").mkdir(parents=True)  # a version folder with nothing exported into it
        assert warnings_after_polls() == [f"No versions of servable m found under base path {base}. Did you forget to "
                                          "name your leaf directory as a number (eg. '/1/')? (numbered folders "
                                          "without a saved_model.pb: 1)"]
        write_half_plus_two(base / "2")
        assert warnings_after_polls() == [] and manager.resolve("m").version == 2
        shutil.rmtree(base / "2")
        assert len(warnings_after_polls()) == 1, "warned again when the versions are gone"


def test_server_side_batching_joins_concurrent_requests(base):
    (base / "batching.config").write_text("max_batch_size { value: 16 } batch_timeout_micros { value: 20000 } "
                                          "num_batch_threads { value: 1 }")
    opts = ServerOptions(port=0, rest_api_port=free_port(), rest_api_host="127.0.0.1", grpc_host="127.0.0.1",
                         model_config_file=str(base / "models.config"), file_system_poll_wait_seconds=0,
                         allow_version_labels_for_unavailable_models=True,
                         enable_batching=True, batching_parameters_file=str(base / "batching.config"))
    srv = ModelServer(opts).start()
    assert srv.manager.wait_until_available(120)
    results = {}

    def one(i):
        with GrpcClient(f"127.0.0.1:{srv.grpc_port}") as c:
            results[i] = c.predict("hp", {"x": np.array([float(i)], np.float32)}, version=123)["y"].tolist()

    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        srv.stop()
    assert results == {i: [0.5 * i + 2] for i in range(16)}
    assert srv.batcher.tasks_run == 16 and srv.batcher.batches_run < 16


def test_clients_retry_until_the_server_is_up(tmp_path):
    write_half_plus_two(tmp_path / "hp" / "1")
    gport, rport = free_port(), free_port()
    opts = ServerOptions(port=gport, rest_api_port=rport, rest_api_host="127.0.0.1", grpc_host="127.0.0.1",
                         model_name="hp", model_base_path=str(tmp_path / "hp"), file_system_poll_wait_seconds=0)
    holder = {}
    starter = threading.Timer(1.0, lambda: holder.setdefault("srv", ModelServer(opts).start()))
    starter.start()
    try:
        with GrpcClient(f"127.0.0.1:{gport}", retries=6, backoff=0.25) as c:
            assert c.predict("hp", {"x": np.array([2.0], np.float32)})["y"].tolist() == [3.0]
        assert RestClient(f"127.0.0.1:{rport}", retries=6, backoff=0.25).predict("hp", instances=[2.0]) == {"predictions": [3.0]}
        with GrpcClient("127.0.0.1:1", retries=0, timeout=5) as c, pytest.raises(ServingClientError) as info:
            c.predict("hp", {"x": np.array([2.0], np.float32)})
        assert info.value.status == "UNAVAILABLE"
    finally:
        starter.join()
        holder["srv"].stop()
