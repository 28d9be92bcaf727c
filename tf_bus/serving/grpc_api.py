"""TF Serving's gRPC API (``tensorflow.serving.PredictionService`` and ``ModelService``)
over the model manager, with the generated stubs of ``tensorflow-serving-api``."""

from __future__ import annotations

import logging
import time
from concurrent import futures

import grpc
import numpy as np

from tf_bus.serving import service
from tf_bus.serving.core import ModelManager, ServingError, invalid

log = logging.getLogger("tf_bus.serving")


def _spec(model_spec) -> tuple[str, int | None, str | None]:
    which = model_spec.WhichOneof("version_choice")
    version = model_spec.version.value if which == "version" else None
    label = model_spec.version_label if which == "version_label" else None
    return model_spec.name, version, label


def _tensor_to_array(proto) -> np.ndarray:
    import tensorflow as tf

    try:
        return tf.make_ndarray(proto)
    except (TypeError, ValueError) as e:
        raise invalid(f"Cannot parse input tensor: {e}") from None


def _array_to_tensor(a: np.ndarray):
    import tensorflow as tf

    return tf.make_tensor_proto(a)


class PredictionServicer:
    """Predict, Classify, Regress, MultiInference, GetModelMetadata."""

    def __init__(self, manager: ModelManager, predict_fn=None, metrics=None):
        self.manager, self.metrics = manager, metrics
        self.predict_fn = predict_fn or service.predict

    def _call(self, api: str, name: str, context, fn):
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return fn()
        except ServingError as e:
            code = e.code
            context.abort(e.code, e.message)
        except Exception as e:  # never crash the server on a request
            code = grpc.StatusCode.INTERNAL
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        finally:
            if self.metrics is not None:
                self.metrics.observe("grpc", name or "-", api, code.name, time.perf_counter() - t0)

    def Predict(self, request, context):
        from tensorflow_serving.apis import predict_pb2

        def run():
            name, version, label = _spec(request.model_spec)
            servable = self.manager.resolve(name, version, label)
            inputs = {k: _tensor_to_array(v) for k, v in request.inputs.items()}
            sig_name, outputs = self.predict_fn(servable, request.model_spec.signature_name, inputs,
                                                list(request.output_filter) or None)
            resp = predict_pb2.PredictResponse()
            resp.model_spec.name, resp.model_spec.signature_name = name, sig_name
            resp.model_spec.version.value = servable.version
            for k, v in outputs.items():
                resp.outputs[k].CopyFrom(_array_to_tensor(v))
            return resp

        return self._call("predict", request.model_spec.name, context, run)

    def _examples(self, api: str, request, context, fn):
        def run():
            name, version, label = _spec(request.model_spec)
            servable = self.manager.resolve(name, version, label)
            result = fn(servable, request.model_spec.signature_name, request.input)
            resp = type_(request)()
            resp.model_spec.name = name
            resp.model_spec.signature_name = request.model_spec.signature_name or service.DEFAULT_SIGNATURE
            resp.model_spec.version.value = servable.version
            resp.result.CopyFrom(result)
            return resp

        def type_(req):
            from tensorflow_serving.apis import classification_pb2, regression_pb2

            return classification_pb2.ClassificationResponse if api == "classify" else regression_pb2.RegressionResponse

        return self._call(api, request.model_spec.name, context, run)

    def Classify(self, request, context):
        return self._examples("classify", request, context, service.classify)

    def Regress(self, request, context):
        return self._examples("regress", request, context, service.regress)

    def MultiInference(self, request, context):
        name = request.tasks[0].model_spec.name if request.tasks else ""
        return self._call("multi_inference", name, context,
                          lambda: service.multi_inference(self.manager.resolve, request))

    def GetModelMetadata(self, request, context):
        def run():
            name, version, label = _spec(request.model_spec)
            servable = self.manager.resolve(name, version, label)
            return service.metadata_response(servable, list(request.metadata_field))

        return self._call("metadata", request.model_spec.name, context, run)


class ModelServicer:
    """GetModelStatus and HandleReloadConfigRequest (ServerCore::ReloadConfig: only a
    model_config_list is accepted; the gRPC status is the reload's, as TF Serving answers)."""

    def __init__(self, manager: ModelManager, metrics=None):
        self.manager, self.metrics = manager, metrics

    def GetModelStatus(self, request, context):
        try:
            name, version, label = _spec(request.model_spec)
            return service.status_response(self.manager.status(name, version, label))
        except ServingError as e:
            context.abort(e.code, e.message)

    def HandleReloadConfigRequest(self, request, context):
        from tensorflow_serving.apis import model_management_pb2

        try:
            if request.config.WhichOneof("config") != "model_config_list":
                raise invalid("ServerModelConfig type not supported by HandleReloadConfigRequest. Only "
                              "ModelConfigList is currently supported")
            self.manager.reload_config(request.config)
            return model_management_pb2.ReloadConfigResponse()  # status: error_code OK, no message
        except ServingError as e:
            log.error("ServerCore::HandleReloadConfigRequest failed: %s", e.message)
            context.abort(e.code, e.message)


def make_grpc_server(manager: ModelManager, port: int, host: str = "0.0.0.0", max_workers: int = 16,
                     max_message_bytes: int = 64 << 20, predict_fn=None, metrics=None,
                     socket_path: str | None = None) -> tuple[grpc.Server, int]:
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tf-bus-grpc"),
                         options=options)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        _wrap(prediction_service_pb2_grpc.PredictionServiceServicer, PredictionServicer(manager, predict_fn, metrics)),
        server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(
        _wrap(model_service_pb2_grpc.ModelServiceServicer, ModelServicer(manager, metrics)), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot bind the gRPC port {host}:{port}")
    if socket_path:  # --grpc_socket_path: the same services on a UNIX socket as well
        try:
            server.add_insecure_port(f"unix:{socket_path}")
        except RuntimeError:
            raise OSError(f"--grpc_socket_path {socket_path}: cannot listen there (is the folder writable?)") from None
    return server, bound


def _wrap(base, impl):
    """An instance of the generated servicer base whose methods are ``impl``'s."""
    cls = type(f"TfBus{base.__name__}", (base,), {
        k: (lambda f: lambda self, request, context: f(request, context))(getattr(impl, k))
        for k in dir(base) if not k.startswith("_") and hasattr(impl, k)
    })
    return cls()
