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
- ``version_labels`` go through ServerCore's label map: a label must name a version that
  is AVAILABLE when the config is applied, so labels in the startup config are refused
  unless ``allow_labels_for_unavailable`` (TF Serving's
  ``--allow_version_labels_for_unavailable_models``: a new label, or one kept at its
  version, may name a version not loaded yet; moving a label still needs its target
  loaded) or ``force_allow_labels`` (any label, any version).
- A version that fails to load is retried ``max_load_retries`` times,
  ``load_retry_interval`` s apart (TF Serving's ``--max_num_load_retries``, default 5, and
  ``--load_retry_interval_micros``, default 60 s), reported LOADING meanwhile, then END
  with its error; it is not tried again until it leaves the disk or the policy and comes
  back (TF Serving does not reload a servable that errored).
- ``reload_config`` is ServerCore::ReloadConfig: the same validation, models dropped from
  the list unloaded (their versions reported END), kept models take their new policy and
  base path without being unloaded, new models loaded before it returns. A refused config
  changes nothing.
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


class ModelConfigError(ServingError, ValueError):
    """A ModelServerConfig the server refuses (at startup or on reload), with TF Serving's
    status code and message."""


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
    # version -> (failed loads, when the next retry may start, the last error): --max_num_load_retries
    failures: dict[int, tuple[int, float, str]] = field(default_factory=dict)


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

    def __init__(self, server_config, poll_seconds: float = 1.0, loader=load_servable, *,
                 allow_labels_for_unavailable: bool = False, force_allow_labels: bool = False,
                 max_load_retries: int = 5, load_retry_interval: float = 60.0):
        self._lock = threading.RLock()  # guards the models' states, the label map and the model table
        self._config_lock = threading.Lock()  # one config change at a time (ServerCore's config_mu_)
        self._poll_lock = threading.Lock()  # one poll at a time: the poller and a reload never load twice
        self._models: dict[str, ModelState] = {}
        self._retired: dict[str, ModelState] = {}  # models a reload removed: their versions stay END in status
        self._labels: dict[str, dict[str, int]] = {}
        self._loader = loader
        self._poll_seconds = poll_seconds
        self._allow_labels_for_unavailable = allow_labels_for_unavailable
        self._force_allow_labels = force_allow_labels
        self._max_load_retries, self._load_retry_interval = max(0, max_load_retries), load_retry_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        configs = self._validate(server_config, first=True)
        self._labels = self._label_map(configs)
        self._models = {mc.name: ModelState(mc) for mc in configs}
        self._config = server_config

    @property
    def config(self):
        """The ModelServerConfig in force (the startup one, or the last reload applied)."""
        return self._config

    # -------------------------------------------------------------- config
    @staticmethod
    def _validate(server_config, first: bool) -> list:
        """ServerCore's checks of a ModelServerConfig; its model configs, in order."""
        which = server_config.WhichOneof("config")
        if which != "model_config_list":
            if first:
                raise ModelConfigError(grpc.StatusCode.INVALID_ARGUMENT,
                                       "the model config must hold a model_config_list (custom_model_config is not "
                                       "supported)")
            raise ModelConfigError(grpc.StatusCode.FAILED_PRECONDITION,
                                   "Cannot transition to requested config. It is only legal to transition from one "
                                   "ModelConfigList to another.")
        configs, seen = list(server_config.model_config_list.config), set()
        for mc in configs:
            if mc.name in seen:
                raise ModelConfigError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"Illegal to list model {mc.name} multiple times in config list")
            seen.add(mc.name)
        for mc in configs:
            if not mc.name or not mc.base_path:
                raise ModelConfigError(grpc.StatusCode.INVALID_ARGUMENT,
                                       "every model config needs a name and a base_path")
            if not (os.path.isabs(mc.base_path) or "://" in mc.base_path):
                raise ModelConfigError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"Expected model {mc.name} to have an absolute path or URI; got "
                                       f"base_path()={mc.base_path}")
            if mc.model_platform not in ("", "tensorflow"):
                raise ModelConfigError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"Model {mc.name} requests unsupported platform {mc.model_platform}")
        return configs

    def _label_map(self, configs) -> dict[str, dict[str, int]]:
        """ServerCore::UpdateModelVersionLabelMap over the current version states."""
        labels: dict[str, dict[str, int]] = {}
        with self._lock:
            for mc in configs:
                state = self._models.get(mc.name)
                for label, version in sorted(mc.version_labels.items()):
                    allowed = self._force_allow_labels
                    if not allowed and self._allow_labels_for_unavailable:
                        old = self._labels.get(mc.name, {}).get(label)
                        allowed = old is None or old == version
                    available = state is not None and state.states.get(version, ("",))[0] == "AVAILABLE"
                    if not (allowed or available):
                        raise ModelConfigError(grpc.StatusCode.FAILED_PRECONDITION,
                                               f"Request to assign label to version {version} of model {mc.name}, "
                                               "which is not currently available for inference")
                    labels.setdefault(mc.name, {})[label] = version
        return labels

    def reload_config(self, server_config) -> None:
        """Applies a new ModelServerConfig as ServerCore::ReloadConfig does (module docstring).

        Raises ``ModelConfigError`` for a config it refuses (nothing changes then), and
        UNKNOWN "N model(s) did not become available" when a new model has no version
        loaded once it returns (the config stays applied; the poller keeps trying)."""
        with self._config_lock:
            if server_config.WhichOneof("config") is None:
                log.info("Taking no action for empty config.")
                return
            configs = self._validate(server_config, first=False)
            labels = self._label_map(configs)
            with self._lock:
                old, models = self._models, {}
                for mc in configs:
                    state = old.get(mc.name) or self._retired.pop(mc.name, None) or ModelState(mc)
                    state.config, models[mc.name] = mc, state
                added = [n for n in models if n not in old]
                for name in [n for n in old if n not in models]:
                    state = self._retired[name] = old[name]
                    for v in list(state.loaded):
                        state.states[v] = ("END", "")
                        log.info("model %s version %s unloaded (removed from the config)", name, v)
                    state.loaded.clear()  # in-flight requests keep their own reference
                self._models, self._labels, self._config = models, labels, server_config
            for mc in configs:
                log.info("(Re-)adding model: %s", mc.name)
            self.poll_once()  # loads what the new models and policies want before returning
            missing = [n for n in added if not models[n].loaded]
            if missing:
                raise ServingError(grpc.StatusCode.UNKNOWN, f"{len(missing)} model(s) did not become available: {{"
                                   + "".join(f"{{{self._why_unavailable(models[n])}}}, " for n in missing) + "}")
            log.info("Finished reloading config")

    @staticmethod
    def _why_unavailable(state: ModelState) -> str:
        name = state.config.name
        failed = [(v, e) for v, (_, _, e) in sorted(state.failures.items())]
        if failed:
            v, e = failed[-1]
            return f"{{name: {name} version: {v}}} due to error: {e}"
        return f"{{name: {name}}} due to error: {state.problem or 'still loading'}"

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
        with self._poll_lock:
            self._poll()

    def _poll(self) -> None:
        with self._lock:
            models = list(self._models.items())
        for name, state in models:
            on_disk = available_versions(state.config.base_path)
            problem = base_path_problem(name, state.config.base_path, on_disk)
            if problem != state.problem:  # logged when it starts or changes, not at every poll
                if problem:
                    log.warning("%s", problem)
                state.problem = problem
            want = aspired_versions(state.config, on_disk)
            for v in [v for v in state.failures if v not in want]:
                del state.failures[v]  # gone from disk or from the policy: tried afresh if it comes back
            for v in want:
                tries, next_try, _ = state.failures.get(v, (0, 0.0, ""))
                if v in state.loaded or tries > self._max_load_retries or time.monotonic() < next_try:
                    continue
                servable_id = f"{{name: {name} version: {v}}}"
                if tries:
                    log.info("Retrying of Loading servable: %s retry: %d", servable_id, tries)
                path = os.path.join(state.config.base_path, str(v))
                with self._lock:
                    state.states[v] = ("LOADING", "")
                try:
                    servable = self._loader(name, v, path)
                except Exception as e:  # a broken version must not take the server down
                    error = e.message if isinstance(e, ServingError) else f"{type(e).__name__}: {e}"
                    log.error("Loading servable: %s failed: %s", servable_id, error)
                    tries += 1
                    state.failures[v] = (tries, time.monotonic() + self._load_retry_interval, error)
                    if tries > self._max_load_retries:
                        if self._max_load_retries:
                            log.info("Retrying of Loading servable: %s exhausted max_num_retries: %d", servable_id,
                                     self._max_load_retries)
                        with self._lock:
                            state.states[v] = ("END", error)
                    continue
                state.failures.pop(v, None)
                with self._lock:
                    state.loaded[v] = servable
                    state.states[v] = ("AVAILABLE", "")
                log.info("model %s version %s loaded from %s", name, v, path)
            with self._lock:
                if self._models.get(name) is not state:
                    for v in list(state.loaded):  # removed by a reload while this poll loaded it
                        state.states[v] = ("END", "")
                    state.loaded.clear()
                    continue
                for v in [v for v in state.loaded if v not in want]:
                    if any(u in state.loaded for u in want) or not want:
                        del state.loaded[v]  # in-flight requests keep their own reference
                        state.states[v] = ("END", "")
                        log.info("model %s version %s unloaded", name, v)

    def wait_until_available(self, timeout: float = 60.0) -> bool:
        """True once every model has a version loaded; False at ``timeout``, or as soon as
        each model without one has failed for good (its load retries spent)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                waiting = [s for s in self._models.values() if not s.loaded]
                if not waiting:
                    return True
                if all(s.failures and all(t > self._max_load_retries for t, _, _ in s.failures.values())
                       for s in waiting):
                    return False
            time.sleep(0.05)
        return False

    # -------------------------------------------------------------- lookups
    def model_names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def _spec(self, name: str, version: int | None, label: str | None) -> tuple[ModelState | None, int | None]:
        """The model's state and the version a (version | label) spec names."""
        if version is not None and label:
            raise invalid(f"Both model version ({version}) and model version label ({label}) cannot be supplied.")
        state = self._models.get(name)
        if label:
            if label not in self._labels.get(name, {}):
                raise invalid(f"Unrecognized servable version label: {label}")
            version = self._labels[name][label]
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
        """(version, state, error message) rows as GetModelStatus reports them (a model a
        reload removed still reports its versions, END)."""
        with self._lock:
            state, version = self._spec(name, version, label)
            state = state or self._retired.get(name)
            if state is None or not state.states:
                raise not_found(f"Could not find any versions of model {name}")
            if version is not None:
                if version not in state.states:
                    raise not_found(f"Could not find version {version} of model {name}")
                return [(version, *state.states[version])]
            return [(v, *state.states[v]) for v in sorted(state.states, reverse=True)]
