"""The model manager of `tf-bus serve`: TF Serving's ServerCore semantics in Python.

- Models come from a ``ModelServerConfig`` (TF Serving's ``--model_config_file`` text
  proto) or one ``--model_name``/``--model_base_path`` pair.
- Each model's versions are the numeric folders under its ``base_path``; the
  ``model_version_policy`` (``latest { num_versions }``, default 1; ``all``;
  ``specific { versions }``) picks which are loaded. ``version_labels`` name versions.
- A poller re-reads the folders every ``file_system_poll_wait_seconds``: a new version is
  loaded and becomes current, then versions the policy no longer wants are dropped.
  A request holds its own reference to the version it resolved, so unloading never
  breaks an in-flight request (availability-preserving, as TF Serving's default policy).
- A base path that is missing or holds no numbered SavedModel folder is logged as a
  warning in TF Serving's words, once each time that starts or changes (TF Serving
  repeats it at every poll).
- Errors are ``ServingError(code, message)`` with TF Serving's codes and messages.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("tf_bus.serving")


class ServingError(Exception):
    """An error with a gRPC status code, answered as TF Serving answers it."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


@dataclass
class Servable:
    """One loaded version: the SavedModel, its signature defs and callable signatures."""

    name: str
    version: int
    path: str
    module: Any
    signature_defs: dict[str, Any]  # name -> tensorflow.core.protobuf.meta_graph_pb2.SignatureDef
    lock: threading.Lock = field(default_factory=threading.Lock)

    def signature(self, name: str):
        return self.module.signatures[name]


def load_servable(name: str, version: int, path: str) -> Servable:
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString(Path(path, "saved_model.pb").read_bytes())
    graph = next((mg for mg in sm.meta_graphs if "serve" in mg.meta_info_def.tags), sm.meta_graphs[0])
    module = tf.saved_model.load(path, tags=["serve"])
    return Servable(name, version, path, module, dict(graph.signature_def))


@dataclass
class ModelState:
    config: Any  # tensorflow_serving.config.model_server_config_pb2.ModelConfig
    loaded: dict[int, Servable] = field(default_factory=dict)
    # version -> (state name, error message): LOADING, AVAILABLE, UNLOADING, END
    states: dict[int, tuple[str, str]] = field(default_factory=dict)
    problem: str | None = None  # why base_path offers no version, last logged


def parse_model_config_file(path: str | os.PathLike):
    """TF Serving's ``--model_config_file``: a ``ModelServerConfig`` in protobuf text format."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"--model_config_file {path}: {e.strerror}") from None
    try:
        return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    except text_format.ParseError as e:
        raise ValueError(f"--model_config_file {path}: not a ModelServerConfig text proto: {e}") from None


def single_model_config(name: str, base_path: str):
    from tensorflow_serving.config import model_server_config_pb2

    cfg = model_server_config_pb2.ModelServerConfig()
    m = cfg.model_config_list.config.add()
    m.name, m.base_path, m.model_platform = name, str(base_path), "tensorflow"
    return cfg


def available_versions(base_path: str) -> list[int]:
    p = Path(base_path)
    if not p.is_dir():
        return []
    return sorted(int(d.name) for d in p.iterdir()
                  if d.name.isdigit() and d.is_dir() and (d / "saved_model.pb").exists())


def base_path_problem(name: str, base_path: str, on_disk: list[int]) -> str | None:
    """Why ``base_path`` offers no version to load, in TF Serving's words; None when it does."""
    if on_disk:
        return None
    p = Path(base_path)
    if not p.is_dir():
        return f"Could not find base path {base_path} for servable {name} with error NOT_FOUND: {base_path} not found"
    empty = sorted((d.name for d in p.iterdir() if d.name.isdigit() and d.is_dir()), key=int)
    hint = f" (numbered folders without a saved_model.pb: {', '.join(empty)})" if empty else ""
    return (f"No versions of servable {name} found under base path {base_path}. Did you forget to name your leaf "
            f"directory as a number (eg. '/1/')?{hint}")


def aspired_versions(model_config, on_disk: list[int]) -> list[int]:
    policy = model_config.model_version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return list(on_disk)
    if which == "specific":
        return [v for v in on_disk if v in set(policy.specific.versions)]
    n = policy.latest.num_versions if which == "latest" and policy.latest.num_versions else 1
    return on_disk[-n:]


class ModelManager:
    """Loads, serves and unloads model versions (see the module docstring)."""

    def __init__(self, server_config, poll_seconds: float = 1.0, loader=load_servable):
        self._lock = threading.RLock()
        self._models: dict[str, ModelState] = {}
        self._loader = loader
        self._poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        which = server_config.WhichOneof("config")
        if which != "model_config_list":
            raise ValueError("the model config must hold a model_config_list (custom_model_config is not supported)")
        for mc in server_config.model_config_list.config:
            if mc.model_platform not in ("", "tensorflow"):
                raise ValueError(f"model {mc.name!r}: model_platform {mc.model_platform!r} is not supported; use tensorflow")
            if not mc.name or not mc.base_path:
                raise ValueError("every model config needs a name and a base_path")
            self._models[mc.name] = ModelState(mc)

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.poll_once()
        if self._poll_seconds > 0:
            self._thread = threading.Thread(target=self._poll_loop, name="tf-bus-model-poller", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self._poll_seconds):
            try:
                self.poll_once()
            except Exception:  # the poller must never die
                log.exception("model poll failed")

    def poll_once(self) -> None:
        """Loads aspired versions not yet loaded, then drops versions no longer aspired."""
        for name, state in list(self._models.items()):
            on_disk = available_versions(state.config.base_path)
            problem = base_path_problem(name, state.config.base_path, on_disk)
            if problem != state.problem:  # logged when it starts or changes, not at every poll
                if problem:
                    log.warning("%s", problem)
                state.problem = problem
            want = aspired_versions(state.config, on_disk)
            for v in want:
                if v in state.loaded:
                    continue
                path = os.path.join(state.config.base_path, str(v))
                with self._lock:
                    state.states[v] = ("LOADING", "")
                try:
                    servable = self._loader(name, v, path)
                except Exception as e:  # a broken version must not take the server down
                    log.error("model %s version %s failed to load: %s", name, v, e)
                    with self._lock:
                        state.states[v] = ("END", f"{type(e).__name__}: {e}")
                    continue
                with self._lock:
                    state.loaded[v] = servable
                    state.states[v] = ("AVAILABLE", "")
                log.info("model %s version %s loaded from %s", name, v, path)
            with self._lock:
                for v in [v for v in state.loaded if v not in want]:
                    if any(u in state.loaded for u in want) or not want:
                        del state.loaded[v]  # in-flight requests keep their own reference
                        state.states[v] = ("END", "")
                        log.info("model %s version %s unloaded", name, v)

    def wait_until_available(self, timeout: float = 60.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if all(s.loaded for s in self._models.values()):
                    return True
            time.sleep(0.05)
        return False

    # -------------------------------------------------------------- lookups
    def model_names(self) -> list[str]:
        return sorted(self._models)

    def _spec(self, name: str, version: int | None, label: str | None) -> tuple[ModelState | None, int | None]:
        """The model's state and the version a (version | label) spec names."""
        if version is not None and label:
            raise invalid(f"Both model version ({version}) and model version label ({label}) cannot be supplied.")
        state = self._models.get(name)
        if label:
            if state is None or label not in state.config.version_labels:
                raise invalid(f"Unrecognized servable version label: {label}")
            version = state.config.version_labels[label]
        return state, version

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """The servable a ModelSpec asks for, with TF Serving's errors."""
        with self._lock:
            state, version = self._spec(name, version, label)
            if state is None or not state.loaded:
                req = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
                raise not_found(f"Servable not found for request: {req}")
            if version is None:
                return state.loaded[max(state.loaded)]
            if version not in state.loaded:
                raise not_found(f"Servable not found for request: Specific({name}, {version})")
            return state.loaded[version]

    def status(self, name: str, version: int | None = None, label: str | None = None) -> list[tuple[int, str, str]]:
        """(version, state, error message) rows as GetModelStatus reports them."""
        with self._lock:
            state, version = self._spec(name, version, label)
            if state is None or not state.states:
                raise not_found(f"Could not find any versions of model {name}")
            if version is not None:
                if version not in state.states:
                    raise not_found(f"Could not find version {version} of model {name}")
                return [(version, *state.states[version])]
            return [(v, *state.states[v]) for v in sorted(state.states, reverse=True)]
