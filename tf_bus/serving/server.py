"""`tf-bus serve`: a model server that speaks TensorFlow Serving's REST and gRPC APIs.

Where ``tensorflow_model_server`` exists, use it (docker/ and serving/ hold the configs);
this server is for machines without it. It takes the same flags where they apply, the
same config files (ModelServerConfig, BatchingParameters, MonitoringConfig text protos)
and the same model directories, so the same clients work against either.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from tf_bus.io import write_bytes_atomic
from tf_bus.serving.core import (ModelConfigError, ModelManager, ServingError, load_servable,
                                 parse_model_config_file, single_model_config)

log = logging.getLogger("tf_bus.serving")


@dataclass
class ServerOptions:
    """The flags of ``tensorflow_model_server`` that `tf-bus serve` implements."""

    port: int = 8500
    rest_api_port: int = 8501
    rest_api_host: str = "0.0.0.0"
    grpc_host: str = "0.0.0.0"
    model_config_file: str | None = None
    model_name: str | None = None
    model_base_path: str | None = None
    enable_batching: bool = False
    batching_parameters_file: str | None = None
    monitoring_config_file: str | None = None
    file_system_poll_wait_seconds: float = 1.0
    model_config_file_poll_wait_seconds: float = 0.0
    allow_version_labels_for_unavailable_models: bool = False
    force_allow_any_version_labels_for_unavailable_models: bool = False
    enable_model_warmup: bool = True
    max_num_load_retries: int = 5
    load_retry_interval_micros: int = 60_000_000
    num_request_iterations_for_warmup: int = 1
    rest_api_max_body_bytes: int = 64 << 20
    grpc_max_message_bytes: int = 64 << 20
    grpc_max_threads: int = 16
    grpc_socket_path: str | None = None


def _text_proto(path: str, message, flag: str):
    from google.protobuf import text_format

    try:
        return text_format.Parse(Path(path).read_text(), message)
    except OSError as e:
        raise ValueError(f"--{flag} {path}: {e.strerror}") from None
    except text_format.ParseError as e:
        raise ValueError(f"--{flag} {path}: not a {type(message).__name__} text proto: {e}") from None


class ModelServer:
    """Model manager + REST + gRPC (+ batching, + Prometheus); ``start``/``stop``."""

    def __init__(self, opts: ServerOptions):
        from tf_bus.serving.batching import Batcher, BatchSettings
        from tf_bus.serving.metrics import DEFAULT_PATH, Metrics
        from tf_bus.serving.protos import batching_parameters_pb2, monitoring_config_pb2

        self.opts = opts
        if opts.model_config_file:
            if opts.model_name or opts.model_base_path:
                raise ValueError("give either --model_config_file or --model_name/--model_base_path, not both")
            config = parse_model_config_file(opts.model_config_file)
        elif opts.model_base_path:
            config = single_model_config(opts.model_name or "default", str(Path(opts.model_base_path).resolve()))
        else:
            raise ValueError("give --model_config_file, or --model_base_path (with --model_name)")
        try:
            self.manager = ModelManager(
                config, poll_seconds=opts.file_system_poll_wait_seconds, loader=self._load,
                allow_labels_for_unavailable=opts.allow_version_labels_for_unavailable_models,
                force_allow_labels=opts.force_allow_any_version_labels_for_unavailable_models,
                max_load_retries=opts.max_num_load_retries,
                load_retry_interval=opts.load_retry_interval_micros / 1e6)
        except ModelConfigError as e:
            hint = (" (labels in the startup config name versions not loaded yet: start with "
                    "--allow_version_labels_for_unavailable_models=true, as tensorflow_model_server needs too)"
                    if "Request to assign label" in e.message else "")
            raise ValueError(f"--model_config_file {opts.model_config_file}: Failed to start server. Error: "
                             f"{e.code.name}: {e.message}{hint}") from None
        self._config_poller: threading.Thread | None = None
        self.metrics, self.metrics_path = None, None
        if opts.monitoring_config_file:
            mc = _text_proto(opts.monitoring_config_file, monitoring_config_pb2.MonitoringConfig(), "monitoring_config_file")
            if mc.prometheus_config.enable:
                self.metrics, self.metrics_path = Metrics(), mc.prometheus_config.path or DEFAULT_PATH
        self.batcher = None
        if opts.enable_batching:
            settings = BatchSettings()
            if opts.batching_parameters_file:
                settings = BatchSettings.from_proto(_text_proto(
                    opts.batching_parameters_file, batching_parameters_pb2.BatchingParameters(), "batching_parameters_file"))
            self.batcher = Batcher(settings)
        self._done, self._stopping = threading.Event(), threading.Event()
        self.rest_port = self.grpc_port = None

    def _load(self, name: str, version: int, path: str):
        """Loads a version, then replays its warmup requests (--enable_model_warmup)."""
        from tf_bus.serving import service

        servable = load_servable(name, version, path)
        if self.opts.enable_model_warmup:
            service.warmup(servable, self.opts.num_request_iterations_for_warmup)
        return servable

    def start(self) -> "ModelServer":
        from tf_bus.serving.grpc_api import make_grpc_server
        from tf_bus.serving.rest import RestApi, make_http_server, serve_in_thread

        self.manager.start()
        self.grpc, self.grpc_port = make_grpc_server(
            self.manager, self.opts.port, self.opts.grpc_host, self.opts.grpc_max_threads,
            self.opts.grpc_max_message_bytes, self.batcher, self.metrics, self.opts.grpc_socket_path)
        self.grpc.start()
        self.http = None
        if self.opts.rest_api_port:
            self.http = make_http_server(RestApi(self.manager, self.batcher), self.opts.rest_api_port,
                                         self.opts.rest_api_host, self.opts.rest_api_max_body_bytes,
                                         self.metrics, self.metrics_path)
            self.rest_port = self.http.server_address[1]
            serve_in_thread(self.http)
        log.info("serving gRPC on %s, REST on %s", self.grpc_port, self.rest_port)
        if self.opts.model_config_file and self.opts.model_config_file_poll_wait_seconds > 0:
            self._config_poller = threading.Thread(target=self._poll_config_file, name="tf-bus-config-poller",
                                                   daemon=True)
            self._config_poller.start()
        return self

    def _poll_config_file(self) -> None:
        """--model_config_file_poll_wait_seconds: re-reads the config file and reloads it
        (TF Serving's PollFilesystemAndReloadConfig, with its log lines). A file equal to
        the config in force is not reloaded; one that differs (edited, or a gRPC reload
        changed the config since) is, as TF Serving reloads the file at every poll."""
        while not self._stopping.wait(self.opts.model_config_file_poll_wait_seconds):
            try:
                self.reload_config_file()
            except Exception:  # the poller must never die
                log.exception("config file poll failed")

    def reload_config_file(self) -> bool:
        """Reads --model_config_file and applies it unless it is the config in force;
        False when it could not be read or applied."""
        try:
            config = parse_model_config_file(self.opts.model_config_file)
        except ValueError as e:
            log.error("Failed to read ModelServerConfig file: %s", e)
            return False
        if config == self.manager.config:
            return True
        try:
            self.manager.reload_config(config)
        except ServingError as e:  # a refused config is tried again at the next poll (a label may wait
            # for its version to load); one applied with a model that did not load is not reloaded again
            log.error("PollFilesystemAndReloadConfig failed to ReloadConfig: %s", e.message)
            return False
        return True

    def stop(self, grace: float = 5.0) -> None:
        """Stops accepting requests, lets in-flight ones finish (up to ``grace`` s), unloads."""
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        self.grpc.stop(grace).wait(grace + 1)
        self._stopping.set()
        if self._config_poller is not None:
            self._config_poller.join(timeout=10)
        if self.batcher is not None:
            self.batcher.close()
        self.manager.stop()
        self._done.set()

    def wait(self) -> None:
        self._done.wait()


def write_models_config(path: str | Path, model_base: str | Path, names) -> Path:
    """Writes TF Serving's ``models.config`` (a ModelServerConfig text proto) serving each
    of ``names`` from ``model_base/<name>/``; returns the path."""
    text = "model_config_list {\n" + "".join(
        f'  config {{ name: "{n}" base_path: "{Path(model_base).resolve() / n}" model_platform: "tensorflow" }}\n'
        for n in names) + "}\n"
    write_bytes_atomic(path, text.encode())
    return Path(path)


def serve_on_loopback(model_base: str | Path, names, config_path: str | Path, *, timeout: float = 120.0) -> ModelServer:
    """Starts a server for ``names`` on free 127.0.0.1 ports (gRPC and REST) and waits
    until every model is AVAILABLE; ``stop()`` it when done (the demo, the notebook)."""
    import socket

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    write_models_config(config_path, model_base, names)
    server = ModelServer(ServerOptions(port=free_port(), rest_api_port=free_port(), rest_api_host="127.0.0.1",
                                       grpc_host="127.0.0.1", model_config_file=str(config_path),
                                       file_system_poll_wait_seconds=0)).start()
    try:
        server.manager.wait_until_available(timeout)
    except BaseException:
        server.stop()
        raise
    return server


def run(opts: ServerOptions, ready_file: str | None = None) -> int:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    server = ModelServer(opts).start()
    if not server.manager.wait_until_available(timeout=300):
        log.warning("not every model has a loaded version yet; serving what is loaded")

    def on_signal(signum, frame):
        print(f"tf-bus serve: signal {signum}, shutting down", flush=True)
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"tf-bus serve: gRPC on port {server.grpc_port}, REST on port {server.rest_port}; models: "
          f"{', '.join(server.manager.model_names())}", flush=True)
    if ready_file:
        write_bytes_atomic(ready_file, f"{server.grpc_port} {server.rest_port}\n".encode())  # never read half-written
    server.wait()
    return 0
