"""Predict, Classify, Regress, MultiInference and metadata over loaded SavedModels, shared by
REST and gRPC, and the replay of a SavedModel's warmup requests at load time.

Inputs arrive as numpy arrays (decoded from JSON or from ``TensorProto``) keyed by the
signature's input aliases; they are checked against the ``SignatureDef`` with TF Serving's
messages, run through the SavedModel's signature function, and returned as numpy arrays.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import grpc
import numpy as np

from tf_bus.serving.core import Servable, ServingError, invalid

log = logging.getLogger("tf_bus.serving")

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"


def signature_def(servable: Servable, name: str):
    name = name or DEFAULT_SIGNATURE
    sig = servable.signature_defs.get(name)
    if sig is None or name.startswith("__"):
        raise invalid(f'Serving signature key "{name}" not found.')
    return name, sig


def input_dtypes(servable: Servable, signature_name: str) -> dict[str, Any]:
    """{input alias: tf.DType} of a signature (REST uses it to read JSON values)."""
    import tensorflow as tf

    name = signature_name or DEFAULT_SIGNATURE
    sig = servable.signature_defs.get(name)
    if sig is None or name.startswith("__"):
        raise invalid(f'Serving signature name: "{name}" not found in signature def')
    return {k: tf.dtypes.as_dtype(v.dtype) for k, v in sig.inputs.items()}


def _run(servable: Servable, name: str, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
    import tensorflow as tf

    fn = servable.signature(name)
    try:
        out = fn(**feeds)
    except tf.errors.OpError as e:
        raise ServingError(_code(e), _op_message(e.message)) from None
    except (TypeError, ValueError) as e:  # shape or dtype refused before running
        raise invalid(str(e).splitlines()[0]) from None
    return {k: v.numpy() for k, v in out.items()}


def _op_message(message: str) -> str:
    """The kernel's own message, without the Python stack TF 2 eager prepends to it."""
    if message.startswith("Graph execution error"):
        message = message.split("\n\n")[-1]
    return message.strip()


def _code(e) -> grpc.StatusCode:
    import tensorflow as tf

    return {tf.errors.InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
            tf.errors.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
            tf.errors.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
            tf.errors.UnimplementedError: grpc.StatusCode.UNIMPLEMENTED,
            tf.errors.FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION}.get(type(e), grpc.StatusCode.INTERNAL)


def predict(servable: Servable, signature_name: str, inputs: dict[str, np.ndarray],
            output_filter: list[str] | None = None) -> tuple[str, dict[str, np.ndarray]]:
    """Runs a predict signature. Returns (signature name used, outputs)."""
    import tensorflow as tf

    name, sig = signature_def(servable, signature_name)
    if sig.method_name not in (PREDICT_METHOD, CLASSIFY_METHOD, REGRESS_METHOD, ""):
        raise invalid(f"Expected prediction signature method_name to be one of {{{PREDICT_METHOD}, {CLASSIFY_METHOD}, "
                      f"{REGRESS_METHOD}}}. Was: {sig.method_name}")
    want, got = set(sig.inputs), set(inputs)
    if want != got:
        missing, extra = sorted(want - got), sorted(got - want)
        raise invalid(f"input size does not match signature: {len(got)}!={len(want)} len({{{','.join(sorted(got))}}}) != "
                      f"len({{{','.join(sorted(want))}}}). Sent extra: {{{','.join(extra)}}}. "
                      f"Missing but required: {{{','.join(missing)}}}.")
    for alias in output_filter or []:
        if alias not in sig.outputs:
            raise invalid(f"output tensor alias not found in signature: {alias} Outputs expected to be in the set "
                          f"{{{','.join(sorted(sig.outputs))}}}.")
    feeds = {}
    for i, alias in enumerate(sorted(sig.inputs)):
        dtype = tf.dtypes.as_dtype(sig.inputs[alias].dtype)
        value = inputs[alias]
        feeds[alias] = _as_tensor(value, dtype, i)
    out = _run(servable, name, feeds)
    if output_filter:
        out = {k: v for k, v in out.items() if k in output_filter}
    return name, out


def _as_tensor(value: np.ndarray, dtype, index: int):
    import tensorflow as tf

    if dtype == tf.string:
        if value.dtype.kind not in "OSU":
            raise invalid(f"Expects arg[{index}] to be string but {_dtype_name(value)} is provided")
        return tf.constant(value.astype(object) if value.dtype.kind != "O" else value, dtype=tf.string)
    if value.dtype.kind in "OSU":
        raise invalid(f"Expects arg[{index}] to be {dtype_string(dtype)} but string is provided")
    return tf.constant(value.astype(dtype.as_numpy_dtype, copy=False))


_TF_NAMES = {"float32": "float", "float64": "double", "float16": "half"}


def dtype_string(dtype) -> str:
    """TensorFlow's DataTypeString spelling (float, double, int32, string ...), as in TF Serving's messages."""
    return _TF_NAMES.get(dtype.name, dtype.name)


def _dtype_name(a: np.ndarray) -> str:
    import tensorflow as tf

    try:
        return dtype_string(tf.dtypes.as_dtype(a.dtype))
    except TypeError:
        return str(a.dtype)


def _examples_tensor(serialized: list[bytes]):
    import tensorflow as tf

    return tf.constant(serialized, dtype=tf.string)


def serialized_examples(input_proto) -> list[bytes]:
    """tensorflow.serving.Input (ExampleList or ExampleListWithContext) -> serialized
    tf.Examples, each merged with the context as TF Serving does."""
    kind = input_proto.WhichOneof("kind")
    if kind == "example_list":
        examples = list(input_proto.example_list.examples)
        out = [e.SerializeToString() for e in examples]
    elif kind == "example_list_with_context":
        ctx = input_proto.example_list_with_context.context
        out = []
        for e in input_proto.example_list_with_context.examples:
            merged = type(e)()
            merged.CopyFrom(ctx)
            merged.MergeFrom(e)
            out.append(merged.SerializeToString())
    else:
        raise invalid("Input is empty.")
    if not out:
        raise invalid("Input is empty.")
    return out


def _run_examples(servable: Servable, signature_name: str, input_proto, method: str, kind: str):
    """Checks a classify/regress signature, runs it on the request's tf.Examples."""
    name, sig = signature_def(servable, signature_name)
    if sig.method_name != method:
        raise invalid(f"Expected {kind} signature method_name to be {method}. Was: {sig.method_name}")
    (alias,) = sig.inputs
    examples = serialized_examples(input_proto)
    return examples, _run(servable, name, {alias: _examples_tensor(examples)})


def classify(servable: Servable, signature_name: str, input_proto):
    """Runs a classify signature; returns a ``ClassificationResult`` proto."""
    from tensorflow_serving.apis import classification_pb2

    examples, out = _run_examples(servable, signature_name, input_proto, CLASSIFY_METHOD, "classification")
    classes, scores = out.get("classes"), out.get("scores")
    if classes is None and scores is None:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Expected classification signature outputs: classes or scores.")
    n = len(examples)
    result = classification_pb2.ClassificationResult()
    for b in range(n):
        c = result.classifications.add()
        width = (scores if scores is not None else classes).reshape(n, -1).shape[1]
        for k in range(width):
            cls = c.classes.add()
            if classes is not None:
                cls.label = classes.reshape(n, -1)[b, k].decode() if isinstance(classes.reshape(n, -1)[b, k], bytes) \
                    else str(classes.reshape(n, -1)[b, k])
            if scores is not None:
                cls.score = float(scores.reshape(n, -1)[b, k])
    return result


def regress(servable: Servable, signature_name: str, input_proto):
    """Runs a regress signature; returns a ``RegressionResult`` proto."""
    from tensorflow_serving.apis import regression_pb2

    examples, out = _run_examples(servable, signature_name, input_proto, REGRESS_METHOD, "regression")
    values = out.get("outputs", next(iter(out.values()))).reshape(len(examples), -1)
    if values.shape[1] != 1:
        raise invalid(f"Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got {list(values.shape)}")
    result = regression_pb2.RegressionResult()
    for v in values[:, 0]:
        result.regressions.add().value = float(v)
    return result


def multi_inference(resolve, request):
    """MultiInference as TensorFlowMultiInferenceRunner: classify and regress tasks of one
    model version over one ``Input``; returns a ``MultiInferenceResponse``.

    ``resolve(name, version, label)`` finds the servable the first task names."""
    from tensorflow_serving.apis import inference_pb2

    if not request.tasks:
        raise invalid("Expected at least one task")
    spec = request.tasks[0].model_spec
    which = spec.WhichOneof("version_choice")
    servable = resolve(spec.name, spec.version.value if which == "version" else None,
                       spec.version_label if which == "version_label" else None)
    model_name, seen, input_tensor = "", set(), None
    for task in request.tasks:
        if not task.model_spec.name:
            raise invalid("Found ModelSpec with an empty model name.")
        if model_name and task.model_spec.name != model_name:
            raise invalid("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
        model_name = task.model_spec.name
        name = task.model_spec.signature_name or DEFAULT_SIGNATURE
        if name in seen:
            raise invalid(f"Duplicate evaluation of signature: {name}")
        seen.add(name)
        sig = servable.signature_defs.get(name)
        if sig is None:
            raise invalid(f"Requested signature not found in model graph: {name}")
        kind = {CLASSIFY_METHOD: "classification", REGRESS_METHOD: "regression"}.get(task.method_name)
        if kind is None:
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"Unsupported signature method_name: {task.method_name}")
        if sig.method_name != task.method_name:
            raise invalid(f"Expected {kind} signature method_name to be {task.method_name}. Was: {sig.method_name}")
        if len(sig.inputs) != 1:
            raise invalid("Expected one input Tensor.")
        tensor = next(iter(sig.inputs.values())).name
        if input_tensor is not None and tensor != input_tensor:
            raise invalid("Input tensor must be the same for all Signatures.")
        input_tensor = tensor
    response = inference_pb2.MultiInferenceResponse()
    for task in request.tasks:
        name = task.model_spec.signature_name or DEFAULT_SIGNATURE
        result = response.results.add()
        result.model_spec.name, result.model_spec.signature_name = model_name, name
        result.model_spec.version.value = servable.version
        if task.method_name == CLASSIFY_METHOD:
            result.classification_result.CopyFrom(classify(servable, name, request.input))
        else:
            result.regression_result.CopyFrom(regress(servable, name, request.input))
    return response


def metadata_response(servable: Servable, metadata_fields: list[str]):
    """A ``GetModelMetadataResponse`` with the ``signature_def`` field (the only one TF Serving has)."""
    from tensorflow_serving.apis import get_model_metadata_pb2

    if not metadata_fields:
        raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
    for f in metadata_fields:
        if f != "signature_def":
            raise invalid(f"Metadata field {f} is not supported")
    resp = get_model_metadata_pb2.GetModelMetadataResponse()
    resp.model_spec.name = servable.name
    resp.model_spec.version.value = servable.version
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    for k, v in servable.signature_defs.items():
        sig_map.signature_def[k].CopyFrom(v)
    resp.metadata["signature_def"].Pack(sig_map)
    return resp


def status_response(rows: list[tuple[int, str, str]]):
    from tensorflow_serving.apis import get_model_status_pb2

    resp = get_model_status_pb2.GetModelStatusResponse()
    for version, state, error in rows:
        s = resp.model_version_status.add()
        s.version = version
        s.state = get_model_status_pb2.ModelVersionStatus.State.Value(state)
        s.status.error_code = 0 if not error else 2  # OK / UNKNOWN (tensorflow.error.Code)
        s.status.error_message = error
    return resp


WARMUP_PATH = ("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000  # TF Serving's kMaxNumRecords


def warmup(servable: Servable, iterations: int = 1) -> int:
    """Replays the SavedModel's ``assets.extra/tf_serving_warmup_requests`` (a TFRecord of
    ``PredictionLog``) ``iterations`` times each, as TF Serving does before a version is
    AVAILABLE; returns the number of records. An error fails the load, as in TF Serving."""
    import tensorflow as tf
    from google.protobuf.message import DecodeError
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(servable.path, *WARMUP_PATH)
    if not os.path.exists(path):
        log.info("No warmup data file found at %s", path)
        return 0
    iterations = max(1, iterations)
    log.info("Starting to read warmup data for model at %s with model-warmup-options num_request_iterations: %d",
             path, iterations)
    t0, n = time.perf_counter(), 0
    try:
        for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
            n += 1
            if n > MAX_WARMUP_RECORDS:
                raise invalid(f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS}) at {path}")
            try:
                record = prediction_log_pb2.PredictionLog.FromString(raw)
            except DecodeError:
                raise invalid(f"Failed to parse warmup record {n} from {path}: not a PredictionLog") from None
            try:
                for _ in range(iterations):
                    _replay(servable, record)
            except ServingError as e:
                raise ServingError(e.code, f"Warmup request failed at {path}, record {n}: {e.message}") from None
    except tf.errors.OpError as e:
        raise invalid(f"Failed to read warmup records at {path}: {e.message}") from None
    log.info("Finished reading warmup data for model at %s. Number of warmup records read: %d. Elapsed time "
             "(microseconds): %d.", path, n, int((time.perf_counter() - t0) * 1e6))
    return n


def _replay(servable: Servable, record) -> None:
    import tensorflow as tf

    kind = record.WhichOneof("log_type")
    if kind == "predict_log":
        req = record.predict_log.request
        inputs = {k: tf.make_ndarray(v) for k, v in req.inputs.items()}
        predict(servable, req.model_spec.signature_name, inputs, list(req.output_filter) or None)
    elif kind == "classify_log":
        req = record.classify_log.request
        classify(servable, req.model_spec.signature_name, req.input)
    elif kind == "regress_log":
        req = record.regress_log.request
        regress(servable, req.model_spec.signature_name, req.input)
    elif kind == "multi_inference_log":
        multi_inference(lambda *_: servable, record.multi_inference_log.request)
    else:
        raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"Unsupported log_type for warmup: {kind}")
