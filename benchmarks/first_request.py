"""First-request latency of `tf-bus serve` with and without SavedModel warmup, in one run.

`tf-bus export` writes ``assets.extra/tf_serving_warmup_requests`` (one serving_default
request); the server replays it before the version is AVAILABLE (``--enable_model_warmup``,
TF Serving's flag and default). This script exports the default U-Net and the default
ResNet50 classifier (untrained: weights do not change the cost) and, for each, starts
`tf-bus serve` ``--repeats`` times with warmup off and on, alternating, and measures:

- ``ready_s``: from starting the process to the model being AVAILABLE (the ready file);
- ``first_ms``: the first gRPC Predict of one 480x560 grey PNG (a different image than the
  warmup one);
- ``steady_ms``: the median of the next ``--requests`` identical requests.

Medians over the repeats and the ratios warmup-off / warmup-on are printed as JSON.

    python benchmarks/first_request.py [--repeats 3] [--requests 5]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_once(base: Path, name: str, warmup: bool, png: bytes, requests: int, tmp: Path) -> dict[str, float]:
    from tf_bus.serving.client import GrpcClient

    port, ready = free_port(), tmp / f"ready_{name}_{warmup}_{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "tf_bus.cli", "serve", "--port", str(port), "--rest_api_port", "0",
           "--host", "127.0.0.1", "--model_name", name, "--model_base_path", str(base / name),
           "--file_system_poll_wait_seconds", "0", f"--enable_model_warmup={str(warmup).lower()}",
           "--ready_file", str(ready)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"tf-bus serve exited early: {' '.join(cmd)}")
            if time.perf_counter() - t0 > 300:
                raise RuntimeError("tf-bus serve did not start in 300 s")
            time.sleep(0.02)
        ready_s = time.perf_counter() - t0
        images = {"images": np.array([png], dtype=object)}
        with GrpcClient(f"127.0.0.1:{port}", retries=0, timeout=120) as c:
            t = time.perf_counter()
            c.predict(name, images)
            first = time.perf_counter() - t
            steady = []
            for _ in range(requests):
                t = time.perf_counter()
                c.predict(name, images)
                steady.append(time.perf_counter() - t)
    finally:
        proc.terminate()
        proc.wait(60)
    return {"ready_s": ready_s, "first_ms": first * 1000, "steady_ms": float(np.median(steady)) * 1000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="server starts per model and setting (default: 3)")
    ap.add_argument("--requests", type=int, default=5, help="requests after the first (default: 5)")
    args = ap.parse_args()
    from tf_bus.tflog import import_tensorflow

    import_tensorflow()  # without the start-up lines TF_CPP_MIN_LOG_LEVEL hides (README, "Installing")

    from PIL import Image

    from tf_bus.config import ClassifierConfig, SegmenterConfig
    from tf_bus.export import export_model
    from tf_bus.models.classifier import build_classifier
    from tf_bus.training.segmentation import build_segmenter

    tmp = Path(tempfile.mkdtemp(prefix="tfbus_first_"))
    base = tmp / "models"
    export_model(build_segmenter(SegmenterConfig()), "segmenter", base, "segmenter", threshold=0.5)
    c = ClassifierConfig()
    export_model(build_classifier(c.backbone, None, c.image_size, c.channels), "classifier", base, "classifier")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 560), dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()

    result = {"image": "480x560 grey PNG", "repeats": args.repeats, "cpu_count": os.cpu_count()}
    for name in ("segmenter", "classifier"):
        runs = {False: [], True: []}
        for i in range(args.repeats):
            for warmup in ((False, True) if i % 2 == 0 else (True, False)):  # alternate against drift
                runs[warmup].append(serve_once(base, name, warmup, png, args.requests, tmp))
        med = {w: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for w, rs in runs.items()}
        result[name] = {"no_warmup": med[False], "warmup": med[True],
                        "first_request_speedup": med[False]["first_ms"] / med[True]["first_ms"],
                        "first_over_steady_no_warmup": med[False]["first_ms"] / med[False]["steady_ms"],
                        "first_over_steady_warmup": med[True]["first_ms"] / med[True]["steady_ms"],
                        "ready_extra_s": med[True]["ready_s"] - med[False]["ready_s"]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
