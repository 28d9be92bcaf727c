"""tf.distribute strategies for the trainers (``--strategy``).

- ``default``: TensorFlow's default strategy (one device, no wrapping);
- ``onedevice``: ``OneDeviceStrategy`` on the first GPU, else the CPU;
- ``mirrored``: ``MirroredStrategy`` over every GPU, or over every logical CPU device when
  there is no GPU (split one CPU into N logical devices with
  ``tf.config.set_logical_device_configuration`` before TensorFlow starts, as the tests do);
- ``multiworker``: ``MultiWorkerMirroredStrategy`` (collective all-reduce over gRPC) across
  the processes named by ``TF_CONFIG``, each with its local GPUs (or its CPU).

``--batch-size`` is the global batch: each of R replicas gets ``batch_size / R`` rows of
it (it must divide evenly). The learning rate belongs to the global batch, so keeping the
global batch while adding replicas changes nothing; if you grow the global batch with the
replicas, scale the learning rate by the same factor (the linear scaling rule).

Multi-worker training runs through Keras's own ``model.fit`` (callbacks, checkpoints,
``BackupAndRestore``, progress bars: the same RUN_DIR as one process). Keras 3.15 on TF
2.21 fails there (keras-team/keras#20585) for two reasons in its TensorFlow trainer, and
``_patch_keras_for_multiworker`` corrects both, only for multi-worker strategies:
1. before the first step, ``fit`` averages one *input* batch across workers with
   ``strategy.reduce`` to build the model symbolically; a collective reduce cannot
   take the per-replica batch, and only shapes are needed: the local replica's batch
   is used instead;
2. the step's scalar logs (loss, metrics) are averaged with ``strategy.reduce(...,
   axis=0)``, which fails on rank-0 values: they are averaged with ``axis=None``.
Gradients are untouched (Keras's optimizer all-reduces them inside ``strategy.run``),
so every worker applies the same update and ends with the same weights (tested with two
processes on 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
from typing import Any

from tf_bus.config import ConfigError
from tf_bus.data.busi import TfBusError

STRATEGIES = ("default", "onedevice", "mirrored", "multiworker")


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds. Received: {text!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be > 0. Received: {text!r}")
    return value


def make_strategy(name: str, *, join_timeout: float | None = None, heartbeat_timeout: float | None = None):
    """The ``tf.distribute.Strategy`` called ``name`` (see the module docstring).

    ``multiworker`` must be created before TensorFlow runs any op in this process (the
    trainers create it first). ``join_timeout`` bounds the wait for every worker to join
    (default ``TF_BUS_JOIN_TIMEOUT`` or 120 s), ``heartbeat_timeout`` how long a lost
    worker goes unnoticed (default ``TF_BUS_HEARTBEAT_TIMEOUT`` or 30 s).
    """
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "multiworker":
        return _multiworker_strategy(join_timeout or _env_seconds("TF_BUS_JOIN_TIMEOUT", 120.0),
                                     heartbeat_timeout or _env_seconds("TF_BUS_HEARTBEAT_TIMEOUT", 30.0))
    gpus = tf.config.list_logical_devices("GPU")
    if name == "onedevice":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return _mirrored(tuple(devices))
    raise ConfigError(f"`strategy` must be one of {', '.join(STRATEGIES)}. Received: strategy={name!r}")


@functools.lru_cache(maxsize=None)
def _mirrored(devices: tuple[str, ...]):
    """One MirroredStrategy per device set and process: two strategies over the same devices
    in one process (two trainings in a notebook) collide in their collective ops."""
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(devices=list(devices))


def parse_tf_config(text: str | None) -> dict[str, Any]:
    """Checks ``TF_CONFIG`` and returns it; a ``ConfigError`` names the field and the fix."""
    if not text:
        raise ConfigError("--strategy multiworker needs TF_CONFIG, e.g. "
                          '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", '
                          '"index": 0}} (the same cluster on every host, its own task index on each)')
    try:
        cfg = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({e}). Received: {text[:200]!r}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("cluster"), dict):
        raise ConfigError('TF_CONFIG needs a "cluster" object, e.g. {"worker": ["host1:12345", "host2:12345"]}')
    cluster = cfg["cluster"]
    jobs = {k: v for k, v in cluster.items() if k in ("chief", "worker")}
    if not jobs or not all(isinstance(v, list) and v for v in jobs.values()):
        raise ConfigError('TF_CONFIG "cluster" needs a non-empty "worker" (and optionally "chief") list of host:port')
    for job, addrs in jobs.items():
        for a in addrs:
            host, _, port = str(a).rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f'TF_CONFIG cluster.{job} entry {a!r} is not host:port')
    task = cfg.get("task")
    if not isinstance(task, dict) or task.get("type") not in jobs:
        raise ConfigError(f'TF_CONFIG "task" needs "type" one of {sorted(jobs)} and an "index". '
                          f"Received: task={task!r}")
    index = task.get("index")
    if not isinstance(index, int) or not 0 <= index < len(jobs[task["type"]]):
        raise ConfigError(f'TF_CONFIG task.index must be 0..{len(jobs[task["type"]]) - 1} for job '
                          f'{task["type"]!r}. Received: index={index!r}')
    return cfg


def task_info() -> tuple[str, int, bool]:
    """(task type, index, is chief) of this process under TF_CONFIG (chief: ``chief`` 0,
    else ``worker`` 0 when there is no chief job). Without TF_CONFIG: a single chief."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        return "worker", 0, True
    cfg = parse_tf_config(text)
    t, i = cfg["task"]["type"], cfg["task"]["index"]
    chief = t == "chief" or (t == "worker" and i == 0 and "chief" not in cfg["cluster"])
    return t, i, chief


@functools.lru_cache(maxsize=1)
def _multiworker_strategy(join_timeout: float, heartbeat_timeout: float):
    """One MultiWorkerMirroredStrategy per process (TensorFlow allows only one)."""
    import tensorflow as tf
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    cfg = parse_tf_config(os.environ.get("TF_CONFIG"))
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    spec = multi_worker_util.normalize_cluster_spec(resolver.cluster_spec())
    if context.context()._context_handle is not None:  # noqa: SLF001 - TF's documented pitfall
        raise TfBusError("--strategy multiworker: TensorFlow already ran an operation in this process, and "
                         "collective ops must be configured at program start. Create the strategy first "
                         "(tf_bus.training.distribute.make_strategy('multiworker') before any other TF call).")
    try:
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2

        # MultiWorkerMirroredStrategy configures the coordination service with unbounded
        # waits unless one is configured already: bound the join and the heartbeat.
        context.context().configure_coordination_service(
            service_type="standalone",
            service_leader=multi_worker_util.coordination_leader(spec),
            coordinated_jobs=[coordination_config_pb2.CoordinatedJob(name=j, num_tasks=spec.num_tasks(j))
                              for j in ("chief", "worker") if j in spec.jobs],
            cluster_register_timeout_in_ms=int(join_timeout * 1000),
            heartbeat_timeout_in_ms=int(heartbeat_timeout * 1000),
        )
    except ImportError:  # pragma: no cover - TF moved the proto; MWMS then uses its own defaults
        pass
    cluster = ", ".join(f"{k}={v}" for k, v in cfg["cluster"].items())
    message = (f"--strategy multiworker: not every worker joined within {join_timeout:g}s ({cluster}; this is "
               f"{cfg['task']['type']} {cfg['task']['index']}). Start every worker with the same TF_CONFIG cluster "
               "and its own task index, and check that the ports are reachable (TF_BUS_JOIN_TIMEOUT sets the wait).")
    # TensorFlow waits for missing workers inside C++, holding the GIL and ignoring SIGTERM,
    # with no timeout of its own: a watchdog process bounds the wait. If this process has
    # not joined within the timeout, it prints the message and kills this process.
    watchdog = _JoinWatchdog(join_timeout + 5.0, f"tf-bus: error: {message}")
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver,
            communication_options=tf.distribute.experimental.CommunicationOptions(
                # A collective waits for the slowest worker, which may still be tracing a
                # ResNet step (a minute or more on a busy CPU); lost workers are caught by
                # the heartbeat, which aborts collectives, not by this timeout.
                timeout_seconds=_env_seconds("TF_BUS_COLLECTIVE_TIMEOUT", 600.0)),
        )
        strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)  # every worker is there
    except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError, tf.errors.AbortedError,
            tf.errors.InternalError) as e:
        raise TfBusError(f"{message} ({type(e).__name__})") from None
    finally:
        watchdog.done()
    _patch_keras_for_multiworker()
    return strategy


_WATCHDOG = """
import os, select, signal, sys
ppid, timeout, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
ready, _, _ = select.select([sys.stdin], [], [], timeout)
if not ready:
    sys.stderr.write(message + "\\n")
    sys.stderr.flush()
    os.kill(ppid, signal.SIGKILL)
"""


class _JoinWatchdog:
    """A child process that kills this one unless ``done()`` is called within ``timeout``
    (closing its stdin; this process dying closes it too)."""

    def __init__(self, timeout: float, message: str):
        import subprocess

        self._proc = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(timeout), message],
                                      stdin=subprocess.PIPE)

    def done(self) -> None:
        self._proc.stdin.close()
        self._proc.wait(timeout=30)


@functools.lru_cache(maxsize=1)
def _patch_keras_for_multiworker() -> None:
    """See the module docstring: two corrections to Keras's TF trainer, multi-worker only."""
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original_reduce = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if not (tf_trainer._collective_all_reduce_multi_worker(strategy) and reduction in ("auto", "mean")):
            return original_reduce(values, strategy, reduction)

        def reduce_one(v):
            local = strategy.experimental_local_results(v)[0] if isinstance(v, tf.distribute.DistributedValues) else v
            if tf.is_tensor(local) and local.shape.rank == 0:
                return strategy.reduce("MEAN", v, axis=None)
            return original_reduce(v, strategy, reduction)

        return tree.map_structure(reduce_one, values)

    tf_trainer.reduce_per_replica = reduce_per_replica
    original_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if strategy is None or not tf_trainer._collective_all_reduce_multi_worker(strategy) or iterator is None:
            return original_build(self, iterator=iterator, data_batch=data_batch)
        for _, _, it in iterator:
            batch = next(it)
            data_batch = tree.map_structure(
                lambda v: strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues) else v, batch)
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build


@contextlib.contextmanager
def worker_failures(strategy_name: str):
    """Turns a lost worker during multi-worker training into a ``TfBusError`` with the fix."""
    import tensorflow as tf

    if strategy_name != "multiworker":
        yield
        return
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError,
            tf.errors.CancelledError, tf.errors.InternalError) as e:
        t, i, _ = task_info()
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise TfBusError(
            f"--strategy multiworker: a worker was lost during training ({type(e).__name__}: {first}); this is "
            f"{t} {i}. Restart every worker with the same command and TF_CONFIG: training resumes from the last "
            "finished epoch (BackupAndRestore), no finished epoch is lost."
        ) from None


def shard_by_data(dataset):
    """Multi-worker input: each worker reads the whole (small, cached) dataset and keeps
    its rows of every global batch (``AutoShardPolicy.DATA``); the file lists are not
    split by file, so no worker ever ends an epoch early."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def check_global_batch(batch_size: int, replicas: int) -> None:
    if batch_size % replicas:
        raise ConfigError(f"`batch_size` {batch_size} is the global batch and must divide evenly over the "
                          f"{replicas} replicas of the strategy; use a multiple of {replicas}.")


def validation_batching(batch_size: int, examples: int, replicas: int) -> tuple[int, bool]:
    """``(batch size, drop_remainder)`` of the validation split under ``replicas`` replicas.

    Under a strategy every validation batch is split over the replicas, and two splits fail:
    Keras 3 builds the distributed model from the first batch averaged over the replicas
    (unequal shares: "AddN ... must have the same size"), and a replica given no image fails
    in BatchNormalization. So every batch is a multiple of ``replicas`` except a last one of
    at least ``replicas`` images: the largest such batch size up to ``batch_size``. Where none
    exists, the last batch (fewer than ``replicas`` images) is left out, and a line says so."""
    if replicas <= 1:
        return batch_size, False
    if examples < replicas:
        raise ConfigError(f"The validation split holds {examples} image(s), fewer than the {replicas} replicas "
                          "of the strategy; use fewer replicas or a larger validation split.")
    largest = min(batch_size, examples) // replicas * replicas
    for b in range(largest, 0, -replicas):
        if examples % b == 0 or examples % b >= replicas:
            return b, False
    print(f"tf-bus: {examples % largest} validation image(s) left out: {examples} do not split into batches "
          f"over {replicas} replicas.")
    return largest, True


def worker_run_dir(run_dir, strategy_name: str):
    """Where this process writes: RUN_DIR, except for a non-chief worker of a multi-worker
    run: RUN_DIR/workers/<type>-<index>, so that the RUN_DIR a user reads is the chief's and
    workers on a shared file system never write the same file. TF_CONFIG is read only for
    ``multiworker``."""
    from pathlib import Path

    if strategy_name != "multiworker":
        return Path(run_dir)
    t, i, chief = task_info()
    return Path(run_dir) if chief else Path(run_dir) / "workers" / f"{t}-{i}"


def backup_and_restore(backup_dir, strategy_name: str):
    """``keras.callbacks.BackupAndRestore``; under ``multiworker`` every worker then takes
    the chief's restored state (weights, optimizer state, epoch), so workers whose own
    backups stopped at different epochs (one was killed mid-epoch) restart in step. Both
    write their files atomically (``_atomic_backup_class``)."""
    # double_checkpoint: a backup that cannot be read falls back to the previous one.
    if strategy_name != "multiworker":
        return _atomic_backup_class()(str(backup_dir), double_checkpoint=True)
    return _chief_synced_backup_class()(str(backup_dir), double_checkpoint=True)


@functools.lru_cache(maxsize=1)
def _atomic_backup_class():
    """``keras.callbacks.BackupAndRestore`` whose files are written to a temporary path and
    renamed. Keras 3.15 truncates ``training_metadata.json`` and then writes it: a process
    killed between the two (the moment an epoch ends, right after its CSV row) left an empty
    file, and the resumed run died in ``fit`` on a ``JSONDecodeError``. Here the weights
    and then the metadata are each replaced whole; a kill between the two renames leaves
    the next epoch's weights with the previous epoch's number, so that epoch is trained
    again, never skipped. A metadata file that still cannot be read (written by an
    earlier version, or a damaged disk) falls back to the previous backup
    (``double_checkpoint``), and without one fails with the file named. At the end of
    training the folder is renamed away before it is removed."""
    import keras

    from tf_bus.data.busi import TfBusError
    from tf_bus.io import save_atomic, write_json_atomic

    class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
        def on_train_begin(self, logs=None):
            try:
                super().on_train_begin(logs)
            except OSError as e:
                raise TfBusError(f"the backup in {self.backup_dir} cannot be read ({e}); delete that folder to start "
                                 "this run over from its first epoch") from None

        def _load_model(self):
            path = self._training_metadata_path
            if os.path.exists(path):
                try:
                    with open(path) as f:
                        int(json.load(f)["epoch"])
                except (ValueError, KeyError, TypeError) as e:
                    # OSError: Keras's on_train_begin then restores the previous backup.
                    raise OSError(f"{path}: not a backup's metadata ({type(e).__name__}: {e})") from None
            super()._load_model()

        def on_train_end(self, logs=None):
            # Renamed away in one step, then removed: a kill during the removal must not
            # leave metadata without its weights (a resume would start at the last epoch
            # from freshly initialised weights).
            if self.delete_checkpoint and os.path.exists(self.backup_dir):
                trash = f"{self.backup_dir.rstrip(os.sep)}.done-{os.getpid()}"
                os.replace(self.backup_dir, trash)
                shutil.rmtree(trash, ignore_errors=True)

        def _save_model(self):
            os.makedirs(self.backup_dir, exist_ok=True)
            if self.double_checkpoint:
                for src, dst in ((self._weights_path, self._prev_weights_path),
                                 (self._training_metadata_path, self._prev_training_metadata_path)):
                    if os.path.exists(src):
                        save_atomic(dst, functools.partial(shutil.copyfile, src))
            save_atomic(self._weights_path, functools.partial(self.model.save_weights, overwrite=True))
            write_json_atomic(self._training_metadata_path, {"epoch": self._current_epoch, "batch": self._last_batch_seen})

    return AtomicBackupAndRestore


def chief_value(strategy, value):
    """The chief's ``value`` on every worker (a sum to which only global replica 0 adds);
    call it inside a ``tf.function``, the same number of times on every worker."""
    import tensorflow as tf

    def pick(x):
        first = tf.equal(tf.distribute.get_replica_context().replica_id_in_sync_group, 0)
        return tf.where(first, x, tf.zeros_like(x))

    return strategy.reduce("SUM", strategy.run(pick, args=(value,)), axis=None)


def chief_decides(flag: bool, strategy_name: str) -> bool:
    """``flag`` as the chief has it, under ``multiworker`` (every worker must call this at
    the same point); ``flag`` itself otherwise. Used where a worker's own files may lag
    the chief's (a worker killed between two writes)."""
    if strategy_name != "multiworker":
        return flag
    import tensorflow as tf

    strategy = make_strategy("multiworker")
    return bool(tf.function(lambda v: chief_value(strategy, v))(tf.constant(int(flag), tf.int64)))


@functools.lru_cache(maxsize=1)
def _chief_synced_backup_class():
    import tensorflow as tf

    from tf_bus.data.busi import TfBusError

    class ChiefSyncedBackupAndRestore(_atomic_backup_class()):
        def on_train_begin(self, logs=None):
            try:
                super().on_train_begin(logs)
            except (TfBusError, OSError, ValueError) as e:
                if task_info()[2]:
                    raise
                # A worker's own backup is only a spare: its state comes from the chief below.
                print(f"tf-bus: ignoring this worker's unreadable backup ({type(e).__name__}); "
                      "taking the chief's state", file=sys.stderr)
            strategy = self.model.distribute_strategy
            variables = list(self.model.variables)
            if self.model.optimizer is not None and self.model.optimizer.built:
                variables += list(self.model.optimizer.variables)

            @tf.function
            def sync(epoch):
                for v in variables:
                    v.assign(tf.cast(chief_value(strategy, tf.convert_to_tensor(v.value)), v.dtype))
                return chief_value(strategy, epoch)

            epoch = int(sync(tf.constant(int(self.model._initial_epoch or 0), tf.int64)))
            self.model._initial_epoch = epoch or None

    return ChiefSyncedBackupAndRestore
