"""Prometheus metrics of `tf-bus serve`, in the text exposition format, at the path of the
``--monitoring_config_file`` (``prometheus_config { enable: true path: "..." }``)."""

from __future__ import annotations

import threading
from collections import defaultdict

#: Latency buckets in seconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DEFAULT_PATH = "/monitoring/prometheus/metrics"  # TF Serving's PrometheusExporter::kPrometheusPath


class Metrics:
    """Request counts and a latency histogram per (protocol, model, API, status)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._count: dict[tuple, int] = defaultdict(int)
        self._hist: dict[tuple, list[float]] = {}

    def observe(self, protocol: str, model: str, api: str, status, seconds: float) -> None:
        key = (protocol, model, api, str(status))
        with self._lock:
            self._count[key] += 1
            h = self._hist.setdefault(key[:3], [0.0] * (len(BUCKETS) + 2))  # buckets..., +Inf, sum
            for i, b in enumerate(BUCKETS):
                if seconds <= b:
                    h[i] += 1
            h[len(BUCKETS)] += 1
            h[-1] += seconds

    def render(self) -> str:
        lines = ["# HELP :tensorflow:serving:request_count Number of requests, by model, API and status.",
                 "# TYPE :tensorflow:serving:request_count counter"]
        with self._lock:
            for (proto, model, api, status), n in sorted(self._count.items()):
                lines.append(f':tensorflow:serving:request_count{{protocol="{proto}",model_name="{model}",'
                             f'API="{api}",status="{status}"}} {n}')
            lines += ["# HELP :tensorflow:serving:request_latency Request latency in seconds.",
                      "# TYPE :tensorflow:serving:request_latency histogram"]
            for (proto, model, api), h in sorted(self._hist.items()):
                labels = f'protocol="{proto}",model_name="{model}",API="{api}"'
                for b, c in zip(BUCKETS, h):
                    lines.append(f':tensorflow:serving:request_latency_bucket{{{labels},le="{b}"}} {int(c)}')
                lines.append(f':tensorflow:serving:request_latency_bucket{{{labels},le="+Inf"}} {int(h[len(BUCKETS)])}')
                lines.append(f":tensorflow:serving:request_latency_sum{{{labels}}} {h[-1]:.6f}")
                lines.append(f":tensorflow:serving:request_latency_count{{{labels}}} {int(h[len(BUCKETS)])}")
        return "\n".join(lines) + "\n"
