"""Clients for TF Serving's REST and gRPC APIs (the real server or `tf-bus serve`).

Every setting is an argument (endpoint, model, version or label, signature, timeout,
retries, message size); there is no module state. Both retry what TF Serving calls
retryable: gRPC ``UNAVAILABLE`` and, over REST, HTTP 503 or a refused connection, with
exponential backoff.

    rest = RestClient("localhost:8501")
    rest.predict("busi_classifier", instances=[{"b64": ...}])
    grpc_client = GrpcClient("localhost:8500")
    grpc_client.predict("busi_classifier", {"images": np.array([png_bytes], dtype=object)})
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np


def _loads(data: bytes):
    """JSON -> Python, with orjson where the text allows (TF Serving may write NaN/Infinity,
    which only the standard library reads)."""
    import orjson

    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


class ServingClientError(Exception):
    """The server answered with an error (``status``: HTTP status or gRPC code name)."""

    def __init__(self, status, message: str):
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


def _model_path(model: str, version: int | None, label: str | None) -> str:
    from urllib.parse import quote

    if version is not None and label:
        raise ValueError("give a version or a label, not both")
    path = f"/v1/models/{quote(model, safe='')}"
    if version is not None:
        path += f"/versions/{int(version)}"
    elif label:
        path += f"/labels/{quote(label, safe='')}"
    return path


class RestClient:
    """TF Serving's REST API: status, metadata, predict, classify, regress."""

    def __init__(self, endpoint: str = "localhost:8501", *, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.2):
        self.base = endpoint if endpoint.startswith("http") else f"http://{endpoint}"
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return _loads(r.read())
            except urllib.error.HTTPError as e:
                text = e.read().decode("utf-8", "replace")
                if e.code == 503 and attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
                    continue
                try:
                    message = json.loads(text).get("error", text)
                except ValueError:
                    message = text
                raise ServingClientError(e.code, message) from None
            except urllib.error.URLError as e:
                if attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
                    continue
                raise ServingClientError("UNAVAILABLE", f"{self.base}: {e.reason}") from None
        raise AssertionError("unreachable")

    def status(self, model: str, version: int | None = None, label: str | None = None) -> dict:
        return self._request("GET", _model_path(model, version, label))

    def metadata(self, model: str, version: int | None = None, label: str | None = None) -> dict:
        return self._request("GET", _model_path(model, version, label) + "/metadata")

    def predict(self, model: str, *, instances: list | None = None, inputs: Any = None,
                signature_name: str | None = None, version: int | None = None, label: str | None = None) -> dict:
        if (instances is None) == (inputs is None):
            raise ValueError("give exactly one of instances (row format) or inputs (columnar format)")
        body: dict[str, Any] = {"instances": instances} if instances is not None else {"inputs": inputs}
        if signature_name:
            body["signature_name"] = signature_name
        return self._request("POST", _model_path(model, version, label) + ":predict", body)

    def _examples(self, api, model, examples, context, signature_name, version, label) -> dict:
        body: dict[str, Any] = {"examples": examples}
        if context is not None:
            body["context"] = context
        if signature_name:
            body["signature_name"] = signature_name
        return self._request("POST", _model_path(model, version, label) + f":{api}", body)

    def classify(self, model: str, examples: list[dict], *, context: dict | None = None,
                 signature_name: str | None = None, version: int | None = None, label: str | None = None) -> dict:
        return self._examples("classify", model, examples, context, signature_name, version, label)

    def regress(self, model: str, examples: list[dict], *, context: dict | None = None,
                signature_name: str | None = None, version: int | None = None, label: str | None = None) -> dict:
        return self._examples("regress", model, examples, context, signature_name, version, label)


class GrpcClient:
    """TF Serving's gRPC API (``tensorflow_serving.apis``): Predict, Classify, Regress,
    MultiInference, GetModelMetadata, GetModelStatus, HandleReloadConfigRequest. Use as a
    context manager or call ``close``."""

    def __init__(self, endpoint: str = "localhost:8500", *, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.2, max_message_bytes: int = 64 << 20):
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.channel = grpc.insecure_channel(endpoint, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)])
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request):
        import grpc

        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
                    continue
                raise ServingClientError(e.code().name, e.details()) from None
        raise AssertionError("unreachable")

    @staticmethod
    def _spec(spec, model, version, label, signature_name=None):
        if version is not None and label:
            raise ValueError("give a version or a label, not both")
        spec.name = model
        if version is not None:
            spec.version.value = int(version)
        elif label:
            spec.version_label = label
        if signature_name:
            spec.signature_name = signature_name

    def predict(self, model: str, inputs: dict[str, np.ndarray], *, signature_name: str | None = None,
                version: int | None = None, label: str | None = None,
                output_filter: list[str] | None = None) -> dict[str, np.ndarray]:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        req = predict_pb2.PredictRequest()
        self._spec(req.model_spec, model, version, label, signature_name)
        for k, v in inputs.items():
            req.inputs[k].CopyFrom(tf.make_tensor_proto(v))
        req.output_filter.extend(output_filter or [])
        resp = self._call(self.predictions.Predict, req)
        return {k: tf.make_ndarray(v) for k, v in resp.outputs.items()}

    @staticmethod
    def _fill_examples(input_proto, examples) -> None:
        """tf.train.Examples, or dicts of feature -> value(s), into a tensorflow.serving.Input."""
        import tensorflow as tf

        for ex in examples:
            e = input_proto.example_list.examples.add()
            if isinstance(ex, tf.train.Example):
                e.CopyFrom(ex)
            else:
                for k, v in ex.items():
                    vals = v if isinstance(v, list) else [v]
                    f = e.features.feature[k]
                    if all(isinstance(x, float) for x in vals):
                        f.float_list.value.extend(vals)
                    elif all(isinstance(x, int) for x in vals):
                        f.int64_list.value.extend(vals)
                    else:
                        f.bytes_list.value.extend(x if isinstance(x, bytes) else str(x).encode() for x in vals)

    def _examples(self, method, request_type, model, examples, signature_name, version, label):
        req = request_type()
        self._spec(req.model_spec, model, version, label, signature_name)
        self._fill_examples(req.input, examples)
        return self._call(method, req).result

    def classify(self, model: str, examples: list, *, signature_name: str | None = None,
                 version: int | None = None, label: str | None = None):
        from tensorflow_serving.apis import classification_pb2

        return self._examples(self.predictions.Classify, classification_pb2.ClassificationRequest, model, examples,
                              signature_name, version, label)

    def regress(self, model: str, examples: list, *, signature_name: str | None = None,
                version: int | None = None, label: str | None = None):
        from tensorflow_serving.apis import regression_pb2

        return self._examples(self.predictions.Regress, regression_pb2.RegressionRequest, model, examples,
                              signature_name, version, label)

    def multi_inference(self, model: str, examples: list, tasks: list[tuple[str, str]], *,
                        version: int | None = None, label: str | None = None):
        """MultiInference: ``tasks`` are (signature name, "classify" or "regress") pairs of one
        model, all run on the same examples; returns the response (one result a task, in order)."""
        from tensorflow_serving.apis import inference_pb2

        req = inference_pb2.MultiInferenceRequest()
        for signature_name, method in tasks:
            task = req.tasks.add()
            self._spec(task.model_spec, model, version, label, signature_name)
            task.method_name = {"classify": "tensorflow/serving/classify",
                                "regress": "tensorflow/serving/regress"}.get(method, method)
        self._fill_examples(req.input, examples)
        return self._call(self.predictions.MultiInference, req)

    def metadata(self, model: str, *, version: int | None = None, label: str | None = None):
        from tensorflow_serving.apis import get_model_metadata_pb2

        req = get_model_metadata_pb2.GetModelMetadataRequest()
        self._spec(req.model_spec, model, version, label)
        req.metadata_field.append("signature_def")
        return self._call(self.predictions.GetModelMetadata, req)

    def status(self, model: str, *, version: int | None = None, label: str | None = None):
        from tensorflow_serving.apis import get_model_status_pb2

        req = get_model_status_pb2.GetModelStatusRequest()
        self._spec(req.model_spec, model, version, label)
        return self._call(self.models.GetModelStatus, req)

    def reload_config(self, config):
        """ModelService.HandleReloadConfigRequest with a ModelServerConfig, or the path of
        its text proto (a ``--model_config_file``); returns once new models are loaded."""
        from tensorflow_serving.apis import model_management_pb2
        from tensorflow_serving.config import model_server_config_pb2

        from tf_bus.serving.core import parse_model_config_file

        if not isinstance(config, model_server_config_pb2.ModelServerConfig):
            config = parse_model_config_file(config)  # a ValueError naming the file when it is not one
        return self._call(self.models.HandleReloadConfigRequest,
                          model_management_pb2.ReloadConfigRequest(config=config))


def predict_images(images: list[bytes], model: str, *, server: str, protocol: str = "grpc",
                   version: int | None = None, label: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """Sends encoded images to a tf-bus model's ``serving_default`` signature and returns
    its outputs as numpy arrays (the same over REST and gRPC)."""
    if protocol == "grpc":
        with GrpcClient(server, timeout=timeout) as c:
            arr = np.empty(len(images), dtype=object)
            arr[:] = images
            return c.predict(model, {"images": arr}, version=version, label=label)
    if protocol != "rest":
        raise ValueError(f"protocol must be grpc or rest. Received: {protocol!r}")
    out = RestClient(server, timeout=timeout).predict(
        model, inputs=[{"b64": base64.b64encode(b).decode()} for b in images], version=version, label=label)["outputs"]
    result = {}
    for k, v in out.items():
        if k.endswith("_bytes"):
            result[k] = np.array([base64.b64decode(x["b64"]) for x in v], dtype=object)
        elif k == "class_names":
            result[k] = np.array([s.encode() for s in v], dtype=object)
        else:
            result[k] = np.asarray(v)
    return result
