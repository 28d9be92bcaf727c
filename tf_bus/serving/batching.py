"""Server-side batching (``--enable_batching``): concurrent Predict calls to the same
model version and signature, with inputs of the same shape past the batch dimension,
are joined along dimension 0 into one run of up to ``max_batch_size`` rows, waiting at
most ``batch_timeout_micros`` for company, then split back. Settings come from a
``BatchingParameters`` text proto (``--batching_parameters_file``), as in TF Serving."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from tf_bus.serving import service


@dataclass
class BatchSettings:
    max_batch_size: int = 32
    batch_timeout_micros: int = 1000
    num_batch_threads: int = 2
    max_enqueued_batches: int = 100

    @classmethod
    def from_proto(cls, p) -> "BatchSettings":
        s = cls()
        for name in ("max_batch_size", "batch_timeout_micros", "num_batch_threads", "max_enqueued_batches"):
            if p.HasField(name):
                setattr(s, name, int(getattr(p, name).value))
        if s.max_batch_size < 1 or s.num_batch_threads < 1:
            raise ValueError("batching parameters: max_batch_size and num_batch_threads must be >= 1")
        return s


@dataclass
class _Task:
    servable: object
    signature: str
    inputs: dict
    output_filter: list | None
    rows: int
    future: Future = field(default_factory=Future)

    def key(self):
        shapes = tuple(sorted((k, v.shape[1:], v.dtype.str) for k, v in self.inputs.items()))
        return id(self.servable), self.signature, shapes, tuple(self.output_filter or ())


class Batcher:
    """A ``predict_fn`` for the REST and gRPC front ends that batches concurrent calls."""

    def __init__(self, settings: BatchSettings):
        self.settings = settings
        self._queue: queue.Queue[_Task] = queue.Queue(maxsize=settings.max_enqueued_batches * settings.max_batch_size)
        self._stop = threading.Event()
        self.tasks_run = 0  # requests answered through the batcher
        self.batches_run = 0  # signature runs they needed
        self._threads = [threading.Thread(target=self._loop, name=f"tf-bus-batch-{i}", daemon=True)
                         for i in range(settings.num_batch_threads)]
        for t in self._threads:
            t.start()

    def __call__(self, servable, signature_name, inputs, output_filter=None):
        rows = {v.shape[0] if v.ndim else -1 for v in inputs.values()}
        if len(rows) != 1 or -1 in rows or next(iter(rows)) > self.settings.max_batch_size:
            return service.predict(servable, signature_name, inputs, output_filter)  # not batchable
        task = _Task(servable, signature_name, inputs, output_filter, rows.pop())
        try:
            self._queue.put_nowait(task)
        except queue.Full:
            from tf_bus.serving.core import ServingError
            import grpc

            raise ServingError(grpc.StatusCode.UNAVAILABLE, "The batch scheduling queue to which this task was submitted is full")
        return task.future.result()

    def close(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        timeout = self.settings.batch_timeout_micros / 1e6
        pending: list[_Task] = []
        while not self._stop.is_set():
            try:
                first = pending.pop(0) if pending else self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch, rows = [first], first.rows
            end = time.monotonic() + timeout
            while rows < self.settings.max_batch_size:
                left = end - time.monotonic()
                if left <= 0:
                    break
                try:
                    t = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if t.key() == first.key() and rows + t.rows <= self.settings.max_batch_size:
                    batch.append(t)
                    rows += t.rows
                else:
                    pending.append(t)
            self.tasks_run += len(batch)
            self.batches_run += 1
            self._run(batch)

    @staticmethod
    def _run(batch: list[_Task]) -> None:
        first = batch[0]
        try:
            if len(batch) == 1:
                first.future.set_result(service.predict(first.servable, first.signature, first.inputs, first.output_filter))
                return
            joined = {k: np.concatenate([t.inputs[k] for t in batch]) for k in first.inputs}
            name, out = service.predict(first.servable, first.signature, joined, first.output_filter)
            total = sum(t.rows for t in batch)
            if any(np.ndim(v) == 0 or np.shape(v)[0] != total for v in out.values()):
                for t in batch:  # outputs not batched along dim 0: run each alone
                    t.future.set_result(service.predict(t.servable, t.signature, t.inputs, t.output_filter))
                return
            start = 0
            for t in batch:
                t.future.set_result((name, {k: v[start:start + t.rows] for k, v in out.items()}))
                start += t.rows
        except BaseException as e:  # every waiting caller gets the error
            for t in batch:
                if not t.future.done():
                    t.future.set_exception(e)
