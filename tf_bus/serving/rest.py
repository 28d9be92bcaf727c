"""TF Serving's REST API (``/v1/models/...``) over the model manager.

Routes, JSON formats and error messages follow tensorflow_serving's
``http_rest_api_handler.cc``, ``http_rest_api_util.cc`` and ``util/json_tensor.cc``:

- ``GET /v1/models/M[/versions/N | /labels/L]``: GetModelStatus as JSON;
- ``GET …/metadata``: ``{"model_spec": …, "metadata": {"signature_def": …}}``;
- ``POST …:predict`` with ``instances`` (row format, answered with ``predictions``) or
  ``inputs`` (columnar, answered with ``outputs``), ``{"b64": …}`` for binary strings,
  outputs whose alias ends in ``_bytes`` written as ``{"b64": …}``;
- ``POST …:classify`` / ``…:regress`` with ``examples`` (and optional ``context``),
  answered with ``{"results": …}``;
- errors as ``{"error": "…"}`` with the HTTP status TF Serving maps each code to.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import grpc
import numpy as np
import orjson

from tf_bus.serving import service
from tf_bus.serving.core import ModelManager, ServingError, invalid

PREDICT_RE = re.compile(r"(?i)/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)")
STATUS_RE = re.compile(r"(?i)/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?")
API_RE = re.compile(r"(?i)/v1/.*")

HTTP_STATUS = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DATA_LOSS: 500, grpc.StatusCode.UNAUTHENTICATED: 401,
}
INT64_MAX = 2**63 - 1


# ----------------------------------------------------------------------------- JSON -> arrays

def _json_text(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), allow_nan=True)


def _is_b64(v: Any) -> bool:
    return isinstance(v, dict) and len(v) == 1 and isinstance(v.get("b64"), str)


def _type_name(v: Any) -> str:
    if v is None:
        return "Null"
    if v is True:
        return "True"
    if v is False:
        return "False"
    return {dict: "Object", list: "Array", str: "String"}.get(type(v), "Number")


def _leaf(v: Any, dtype) -> Any:
    import tensorflow as tf

    def type_error():
        return invalid(f"JSON Value: {_json_text(v)} Type: {_type_name(v)} is not of expected type: {service.dtype_string(dtype)}")

    if dtype == tf.string:
        if _is_b64(v):
            try:
                return base64.b64decode(v["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise invalid("Unable to base64 decode") from None
        if isinstance(v, dict):
            raise invalid(f"JSON Value: {_json_text(v)} not formatted correctly for base64 data")
        if not isinstance(v, str):
            raise type_error()
        return v.encode()
    if isinstance(v, bool):
        if dtype == tf.bool:
            return v
        raise type_error()
    if dtype == tf.bool or not isinstance(v, (int, float)):
        raise type_error()
    if dtype.is_floating:
        if isinstance(v, float) and math.isfinite(v) and abs(v) > float(np.finfo(dtype.as_numpy_dtype).max):
            raise invalid(f"Cannot convert JSON value: {_json_text(v)} to {service.dtype_string(dtype)} without loss of precision.")
        return v
    if isinstance(v, float) or not (dtype.min <= v <= dtype.max):
        raise type_error()
    return v


def _dense_shape(v: Any) -> list[int]:
    shape = []
    while isinstance(v, list):
        shape.append(len(v))
        if not v:
            break
        v = v[0]
    return shape


def _fill(v: Any, level: int, shape: list[int], dtype, out: list) -> None:
    if not isinstance(v, list):
        if level != len(shape):
            raise invalid(f"JSON Value: {_json_text(v)} found at incorrect level: {level + 1} in the JSON DOM. "
                          f"Expected at level: {len(shape)}")
        out.append(_leaf(v, dtype))
        return
    if level >= len(shape):
        raise invalid(f"Encountered list at unexpected level: {level} expected < {len(shape)}")
    if len(v) != shape[level]:
        raise invalid(f"Encountered list at unexpected size: {len(v)} at level: {level} expected size: {shape[level]}")
    for item in v:
        _fill(item, level + 1, shape, dtype, out)


def to_array(v: Any, dtype) -> np.ndarray:
    """A JSON value (scalar or nested lists) -> a dense array of ``dtype``, validated as TF Serving does."""
    import tensorflow as tf

    shape = _dense_shape(v)
    flat: list = []
    _fill(v, 0, shape, dtype, flat)
    if dtype == tf.string:
        arr = np.empty(len(flat), dtype=object)
        arr[:] = flat
        return arr.reshape(shape)
    return np.asarray(flat, dtype=dtype.as_numpy_dtype).reshape(shape)


def parse_json_body(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise invalid("JSON Parse error: The document is empty")
    try:
        doc = json.loads(body)
    except UnicodeDecodeError:
        raise invalid("JSON Parse error: Invalid encoding in string. at offset: 0") from None
    except json.JSONDecodeError as e:
        raise invalid(f"JSON Parse error: Invalid value. at offset: {e.pos} ({e.msg})") from None
    except RecursionError:
        raise invalid("JSON Parse error: the document is nested too deeply") from None
    if not isinstance(doc, dict):
        raise invalid(f"JSON Value: {_json_text(doc)[:200]} Is not object")
    sig = doc.get("signature_name")
    if "signature_name" in doc and not isinstance(sig, str):
        raise invalid(f"JSON Value: {_json_text(doc)[:200]} not formatted correctly. 'signature_name' key must be a string value.")
    return doc


def predict_inputs(doc: dict[str, Any], dtypes: dict[str, Any]) -> tuple[dict[str, np.ndarray], str]:
    """The request's tensors and its format (``row`` or ``columnar``)."""
    if not dtypes:
        raise invalid(f"Failed to get input map for signature: {doc.get('signature_name') or 'DEFAULT'}")
    has_inst, has_inputs = "instances" in doc, "inputs" in doc
    if has_inst and has_inputs:
        raise invalid(f"JSON Value: {_json_text(doc)[:200]} Not formatted correctly expecting only one of 'inputs' or "
                      "'instances' keys to exist ")
    if has_inst:
        inst = doc["instances"]
        if not isinstance(inst, list):
            raise invalid(f"JSON Value: {_json_text(doc)[:200]} Excepting 'instances' to be an list/array")
        if not inst:
            raise invalid(f"JSON Value: {_json_text(doc)[:200]} No values in 'instances' array")
        return _from_instances(inst, dtypes), "row"
    if has_inputs:
        return _from_inputs(doc["inputs"], dtypes), "columnar"
    raise invalid("Missing 'inputs' or 'instances' key")


def _from_instances(inst: list, dtypes: dict[str, Any]) -> dict[str, np.ndarray]:
    is_obj = lambda v: isinstance(v, dict) and not _is_b64(v)  # noqa: E731
    if not is_obj(inst[0]) and len(dtypes) > 1:
        raise invalid("instances is a plain list, but expecting list of objects as multiple input tensors required as "
                      "per tensorinfo_map")
    objects = is_obj(inst[0])
    per_name: dict[str, list[np.ndarray]] = {k: [] for k in dtypes}
    for i, elem in enumerate(inst):
        if objects:
            if not is_obj(elem):
                raise invalid(f"Expecting object but got list at item {i} of input list")
            for name, value in elem.items():
                if name not in dtypes:
                    raise invalid(f"Failed to process element: {i} key: {name} of 'instances' list. Error: "
                                  f"INVALID_ARGUMENT: JSON object: does not have named input: {name}")
                try:
                    per_name[name].append(_instance_item(value, dtypes[name], per_name[name]))
                except ServingError as e:
                    raise invalid(f"Failed to process element: {i} key: {name} of 'instances' list. Error: "
                                  f"INVALID_ARGUMENT: {e.message}") from None
            if set(elem) != set(dtypes):
                raise invalid(f"Failed to process element: {i} of 'instances' list. JSON object: {_json_text(elem)[:200]} "
                              f"keys must be equal to: {','.join(sorted(dtypes))}")
        else:
            if is_obj(elem):
                raise invalid(f"Expecting value/list but got object at item {i} of input list")
            (name,) = dtypes
            try:
                per_name[name].append(_instance_item(elem, dtypes[name], per_name[name]))
            except ServingError as e:
                raise invalid(f"Failed to process element: {i} of 'instances' list. Error: INVALID_ARGUMENT: {e.message}") from None
    return {k: np.stack(v) if v[0].dtype != object else _stack_objects(v) for k, v in per_name.items()}


def _stack_objects(items: list[np.ndarray]) -> np.ndarray:
    out = np.empty((len(items), *items[0].shape), dtype=object)
    for i, a in enumerate(items):
        out[i] = a if a.ndim else a[()]
    return out


def _instance_item(value: Any, dtype, previous: list[np.ndarray]) -> np.ndarray:
    arr = to_array(value, dtype)
    if previous:
        first = previous[0]
        if first.size != arr.size:
            raise invalid(f"Expecting tensor size: {first.size} but got: {arr.size}")
        if first.shape != arr.shape:
            raise invalid(f"Expecting shape [{','.join(map(str, first.shape))}] but got: [{','.join(map(str, arr.shape))}]")
    return arr


def _from_inputs(val: Any, dtypes: dict[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(val, dict) or _is_b64(val):
        if len(dtypes) > 1:
            raise invalid("inputs is a plain value/list, but expecting an object as multiple input tensors required as "
                          "per tensorinfo_map")
        (name,) = dtypes
        return {name: to_array(val, dtypes[name])}
    out = {}
    for name, dtype in dtypes.items():
        if name not in val:
            raise invalid(f"Missing named input: {name} in 'inputs' object.")
        out[name] = to_array(val[name], dtype)
    return out


# ----------------------------------------------------------------------------- arrays -> JSON

def _float_texts(a: np.ndarray) -> np.ndarray:
    """Shortest round-trip decimal of each float32/float64 value; whole numbers get '.0';
    NaN and infinities as TF Serving writes them."""
    texts = a.astype(str)
    if a.size and not np.isfinite(a).all():
        texts = np.where(np.isnan(a), "NaN", texts)
        texts = np.where(np.isposinf(a), "Infinity", texts)
        texts = np.where(np.isneginf(a), "-Infinity", texts)
    return texts


def _leaf_texts(name: str, a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "f":
        return _float_texts(a.astype(np.float32) if a.dtype == np.float16 else a)
    if a.dtype.kind == "b":
        return np.where(a, "true", "false")
    if a.dtype.kind in "iu":
        return a.astype(str)
    if a.dtype.kind in "OSU":
        flat = a.reshape(-1)
        out = np.empty(flat.shape, dtype=object)
        for i, v in enumerate(flat):
            b = v if isinstance(v, bytes) else str(v).encode()
            out[i] = '{"b64":"' + base64.b64encode(b).decode() + '"}' if name.endswith("_bytes") \
                else json.dumps(b.decode("utf-8", errors="replace"))
        return out.reshape(a.shape)
    raise invalid(f"Failed to write JSON value for tensor type: {a.dtype}")


def _nest(texts) -> str:
    if not isinstance(texts, np.ndarray):  # one element of an object array
        return str(texts)
    if texts.ndim == 0:
        return str(texts)
    if texts.ndim == 1:
        return "[" + ",".join(texts.tolist()) + "]"
    return "[" + ",".join(_nest(t) for t in texts) + "]"


def _json_of(name: str, a: np.ndarray) -> str:
    """One tensor (or one row of it) as JSON text. Finite numbers go through orjson
    (shortest round-trip decimals, ~30x quicker than formatting in Python: a 480x560
    mask is 269 k floats); NaN/Infinity, strings and bytes through ``_leaf_texts``."""
    a = np.asarray(a)
    if a.ndim and a.dtype.kind in "iub" or (a.ndim and a.dtype.kind == "f" and np.isfinite(a).all()):
        return orjson.dumps(a.astype(np.float32) if a.dtype == np.float16 else a,
                            option=orjson.OPT_SERIALIZE_NUMPY).decode()
    return _nest(_leaf_texts(name, a))


def outputs_json(outputs: dict[str, np.ndarray], fmt: str) -> str:
    if not outputs:
        raise invalid("Cannot convert empty tensor map to JSON")
    names = sorted(outputs)
    arrays = {n: np.asarray(outputs[n]) for n in names}
    if fmt == "columnar":
        if len(names) == 1:
            return '{"outputs":' + _json_of(names[0], arrays[names[0]]) + "}"
        return '{"outputs":{' + ",".join(json.dumps(n) + ":" + _json_of(n, arrays[n]) for n in names) + "}}"
    batch = None
    for n in names:
        if arrays[n].ndim == 0:
            raise invalid(f"Tensor name: {n} has no shape information ")
        if batch is not None and arrays[n].shape[0] != batch:
            raise invalid(f"Tensor name: {n} has inconsistent batch size: {arrays[n].shape[0]} expecting: {batch}")
        batch = arrays[n].shape[0]
    items = []
    for i in range(batch or 0):
        if len(names) == 1:
            items.append(_json_of(names[0], arrays[names[0]][i]))
        else:
            items.append("{" + ",".join(json.dumps(n) + ":" + _json_of(n, arrays[n][i]) for n in names) + "}")
    return '{"predictions":[' + ",".join(items) + "]}"


# ----------------------------------------------------------------------------- classify / regress

def examples_input(doc: dict[str, Any], method: str):
    """The ``examples`` (+ ``context``) of a classify/regress body as a tensorflow.serving.Input."""
    from tensorflow_serving.apis import input_pb2

    inp = input_pb2.Input()
    if "context" in doc:
        _example_from_json(doc["context"], inp.example_list_with_context.context)
    examples = doc.get("examples")
    if "examples" not in doc:
        raise invalid(f"JSON Value: {_json_text(doc)[:200]} When method is {method}, key 'examples' is expected and was not found")
    if not isinstance(examples, list):
        raise invalid(f"JSON Value: {_json_text(doc)[:200]} Expecting 'examples' value to be an list/array")
    if not examples:
        raise invalid(f"JSON Value: {_json_text(doc)[:200]} 'examples' value is an empty array")
    target = inp.example_list_with_context.examples if "context" in doc else inp.example_list.examples
    for e in examples:
        _example_from_json(e, target.add())
    return inp


def _example_from_json(obj: Any, example) -> None:
    if not isinstance(obj, dict):
        raise invalid(f"Example must be JSON object but got JSON {_type_name(obj)}")
    for name, content in obj.items():
        feature = example.features.feature[name]
        for v in content if isinstance(content, list) else [content]:
            _add_feature_value(name, v, feature)


def _add_feature_value(name: str, v: Any, feature) -> None:
    kind = feature.WhichOneof("kind")

    def need(k):
        if kind not in (None, k):
            raise invalid(f"Unexpected element type in feature: {name} expecting type: {kind.replace('_list', '')}")

    if v is None or isinstance(v, list):
        raise invalid(f"Feature: {name} has element with unexpected JSON type: {_type_name(v)}")
    if isinstance(v, bool):
        need("int64_list")
        feature.int64_list.value.append(int(v))
    elif isinstance(v, dict):
        if not _is_b64(v):
            raise invalid(f"Feature: {name} has element with unexpected JSON type: Object")
        need("bytes_list")
        try:
            feature.bytes_list.value.append(base64.b64decode(v["b64"], validate=True))
        except (binascii.Error, ValueError):
            raise invalid("Unable to base64 decode") from None
    elif isinstance(v, str):
        need("bytes_list")
        feature.bytes_list.value.append(v.encode())
    elif isinstance(v, float):
        need("float_list")
        feature.float_list.value.append(v)
    else:
        need("int64_list")
        if v > INT64_MAX:
            raise invalid(f"Feature: {name} has uint64 element. Only int64 is supported.")
        feature.int64_list.value.append(v)


def classification_json(result) -> str:
    if not result.classifications:
        raise invalid("Cannot convert empty ClassificationResults to JSON")
    rows = []
    for c in result.classifications:
        rows.append("[" + ",".join("[" + json.dumps(k.label) + "," + _float_texts(np.float32(k.score)).item() + "]"
                                   for k in c.classes) + "]")
    return '{"results":[' + ",".join(rows) + "]}"


def regression_json(result) -> str:
    if not result.regressions:
        raise invalid("Cannot convert empty RegressionResults to JSON")
    return '{"results":[' + ",".join(_float_texts(np.float32(r.value)).item() for r in result.regressions) + "]}"


# ----------------------------------------------------------------------------- the handler

class RestApi:
    """Routes one request to the manager; returns (HTTP status, JSON text)."""

    def __init__(self, manager: ModelManager, predict_fn: Callable | None = None):
        self.manager = manager
        # server-side batching plugs in here; default: run the signature directly
        self.predict_fn = predict_fn or service.predict

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, str, str, str]:
        """Returns (HTTP status, JSON body, model name, API method) for metrics."""
        model, api = "", ""
        try:
            status, text, model, api = 200, *self._dispatch(method, path, body)
        except ServingError as e:
            status, text = HTTP_STATUS.get(e.code, 500), json.dumps({"error": e.message})
        except Exception as e:  # never crash the server on a request
            status, text = 500, json.dumps({"error": f"{type(e).__name__}: {e}"})
        return status, text, model, api

    def _dispatch(self, method: str, path: str, body: bytes) -> tuple[str, str, str]:
        malformed = invalid(f"Malformed request: {method} {path}")
        if method == "POST":
            m = PREDICT_RE.fullmatch(path)
            if not m:
                raise malformed
            name, version, label, api = self._model_info(m.group(1), m.group(2), m.group(3))
            api = m.group(4).lower()
            doc = parse_json_body(body)
            if api == "predict":
                servable = self.manager.resolve(name, version, label)
                dtypes = service.input_dtypes(servable, doc.get("signature_name", ""))
                inputs, fmt = predict_inputs(doc, dtypes)
                _, outputs = self.predict_fn(servable, doc.get("signature_name", ""), inputs)
                return outputs_json(outputs, fmt), name, api
            inp = examples_input(doc, api)
            servable = self.manager.resolve(name, version, label)
            if api == "classify":
                return classification_json(service.classify(servable, doc.get("signature_name", ""), inp)), name, api
            return regression_json(service.regress(servable, doc.get("signature_name", ""), inp)), name, api
        if method == "GET":
            m = STATUS_RE.fullmatch(path)
            if not m:
                raise malformed
            name, version, label, _ = self._model_info(m.group(1) or "", m.group(2), m.group(3))
            if not name:
                raise invalid("Missing model name in request.")
            if m.group(4):
                servable = self.manager.resolve(name, version, label)
                return _metadata_json(service.metadata_response(servable, ["signature_def"])), name, "metadata"
            return _message_json(service.status_response(self.manager.status(name, version, label))), name, "status"
        raise malformed

    @staticmethod
    def _model_info(name: str, version: str | None, label: str | None):
        name = urllib.parse.unquote(name)
        v = None
        if version:
            v = int(version)
            if v > INT64_MAX:
                raise invalid(f"Failed to convert version: {version} to numeric.")
        return name, v, urllib.parse.unquote(label) if label else None, None


def _message_json(msg) -> str:
    from google.protobuf import json_format

    return json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                                always_print_fields_with_no_presence=True), indent=1)


def _metadata_json(resp) -> str:
    from google.protobuf import json_format
    from tensorflow_serving.apis import get_model_metadata_pb2

    sig_map = get_model_metadata_pb2.SignatureDefMap()
    resp.metadata["signature_def"].Unpack(sig_map)
    opts = dict(preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return json.dumps({"model_spec": json_format.MessageToDict(resp.model_spec, **opts),
                       "metadata": {"signature_def": json_format.MessageToDict(sig_map, **opts)}}, indent=1)


def make_http_server(api: RestApi, port: int, host: str = "0.0.0.0", max_body_bytes: int = 64 << 20,
                     metrics=None, metrics_path: str | None = None) -> ThreadingHTTPServer:
    """A threaded HTTP server answering ``/v1/...`` (and the Prometheus path, if given)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "tf-bus-serve"

        def log_message(self, fmt, *args):  # quiet; the metrics count requests
            pass

        def _reply(self, status: int, text: str, content_type: str = "application/json") -> None:
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _serve(self, method: str) -> None:
            path = urllib.parse.urlsplit(self.path).path
            if metrics is not None and metrics_path and method == "GET" and path == metrics_path:
                return self._reply(200, metrics.render(), "text/plain; version=0.0.4")
            length = int(self.headers.get("Content-Length") or 0)
            if length > max_body_bytes:
                self.close_connection = True
                left = length  # drain (without keeping) what the client sends, so it reads the answer
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    if not chunk:
                        break
                    left -= len(chunk)
                return self._reply(413, json.dumps({"error": f"Request body of {length} bytes exceeds the limit of "
                                                             f"{max_body_bytes} bytes (--rest_api_max_body_bytes)"}))
            body = self.rfile.read(length) if length else b""
            if not API_RE.fullmatch(path):
                return self._reply(404, "<HTML><HEAD><TITLE>Not Found</TITLE></HEAD></HTML>", "text/html")
            t0 = time.perf_counter()
            status, text, model, api = api_.handle(method, path, body)
            if metrics is not None:
                metrics.observe("rest", model or "-", api or method.lower(), status, time.perf_counter() - t0)
            self._reply(status, text)

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

        def do_PUT(self):
            self._serve("PUT")

        def do_DELETE(self):
            self._serve("DELETE")

    api_ = api
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, name="tf-bus-rest", daemon=True)
    t.start()
    return t
