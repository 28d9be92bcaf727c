"""Serving latency and throughput: REST and gRPC through `tf-bus serve`, against the
in-process call of the same SavedModel signature, measured in the same run.

The default U-Net (or the classifier with --model classifier), untrained (weights do not
change the cost), is exported to a temporary folder and served twice by `tf-bus serve`
subprocesses: without and with server-side batching. For each protocol:

- batch 1: N sequential requests of one encoded image -> p50 / p99 latency, and the p50
  ratio to the in-process ``signature(images=...)`` call (targets: REST <= 1.3, gRPC <= 1.15);
- 16 concurrent clients, each sending requests of one image -> throughput (requests/s),
  without and with batching (target: batching >= 2x).

Two bounds, measured in the same run, say what no server can beat on this machine:

- ``rest_json_floor``: encoding the signature's outputs as TF Serving's JSON (the
  server's own ``outputs_json``) and decoding them as the REST client does, with no
  network or server in between; ``rest_p50_ratio_floor`` = (in-process + that) /
  in-process. The segmenter's ``mask_probabilities`` are one float per input pixel.
- ``batch_ceiling``: the in-process signature on one batch of ``--clients`` images,
  against ``--clients`` calls of one image (``in_process_batch_speedup``), and that batch's
  images/s against the unbatched server's throughput (``batching_speedup_ceiling``):
  server-side batching can only win what the model itself wins from a bigger batch.

Segmenter only, ``postprocess_largest``: the in-process signature exported with
``--postprocess largest`` (largest component, holes filled, in TensorFlow ops) against the
plain one, timed alternately in the same process; ``mask_components`` counts the plain
mask's 8-connected components (the untrained U-Net's mask of the noise image, both exported
at the median of its probabilities there, ``threshold``, so the mask is ragged).

    python benchmarks/serving_latency.py [--model segmenter|classifier] [--requests 60]
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
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs, q):
    return float(np.percentile(np.asarray(xs) * 1000.0, q))


def start_server(base: Path, name: str, batching: bool, tmp: Path):
    grpc_port, rest_port = free_port(), free_port()
    ready = tmp / f"ready_{batching}"
    cmd = [sys.executable, "-m", "tf_bus.cli", "serve", "--port", str(grpc_port), "--rest_api_port", str(rest_port),
           "--host", "127.0.0.1", "--model_name", name, "--model_base_path", str(base / name),
           "--file_system_poll_wait_seconds", "0", "--ready_file", str(ready)]
    if batching:
        cfg = tmp / "batching.txt"
        cfg.write_text("max_batch_size { value: 16 } batch_timeout_micros { value: 5000 } num_batch_threads { value: 1 }")
        cmd += ["--enable_batching", "--batching_parameters_file", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    for _ in range(1200):
        if ready.exists():
            return proc, grpc_port, rest_port
        if proc.poll() is not None:
            raise RuntimeError("tf-bus serve exited early")
        time.sleep(0.1)
    raise RuntimeError("tf-bus serve did not start")


def timed(fn, n):
    fn()  # warm-up
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def throughput(make_call, clients: int, per_client: int) -> float:
    calls = [make_call() for _ in range(clients)]
    for c in calls:
        c()  # warm-up, connections open
    barrier = threading.Barrier(clients + 1)

    def run(c):
        barrier.wait()
        for _ in range(per_client):
            c()

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return clients * per_client / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("segmenter", "classifier"), default="segmenter")
    ap.add_argument("--requests", type=int, default=60, help="sequential requests per protocol at batch 1")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-client", type=int, default=6)
    args = ap.parse_args()

    from tf_bus.tflog import import_tensorflow

    tf = import_tensorflow()  # without the start-up lines TF_CPP_MIN_LOG_LEVEL hides (README, "Installing")
    from PIL import Image

    from tf_bus.config import ClassifierConfig, SegmenterConfig
    from tf_bus.export import export_model
    from tf_bus.serving.client import GrpcClient, RestClient

    tmp = Path(tempfile.mkdtemp(prefix="tfbus_bench_"))
    if args.model == "segmenter":
        from tf_bus.training.segmentation import build_segmenter

        cfg = SegmenterConfig()
        model = build_segmenter(cfg)
    else:
        from tf_bus.models.classifier import build_classifier

        cfg = ClassifierConfig()
        model = build_classifier(cfg.backbone, None, cfg.image_size, cfg.channels)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 560), dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()  # a BUSI-sized grey image
    threshold = None
    if args.model == "segmenter":
        # The untrained U-Net's probabilities may all lie on one side of 0.5; its median on
        # the benchmark image as the threshold gives a ragged mask for `largest` to work on.
        export_model(model, args.model, tmp, "probe")
        probe = tf.saved_model.load(str(tmp / "probe" / "1")).signatures["serving_default"]
        threshold = float(np.median(probe(images=tf.constant([png]))["mask_probabilities"].numpy()))
        export_model(model, args.model, tmp, "segmenter_largest", threshold=threshold, postprocess="largest")
    export_model(model, args.model, tmp, args.model, threshold=threshold)

    sig = tf.saved_model.load(str(tmp / args.model / "1")).signatures["serving_default"]
    images = tf.constant([png])
    in_process = timed(lambda: sig(images=images), args.requests)
    from tf_bus.serving.client import _loads
    from tf_bus.serving.rest import outputs_json

    outputs = {k: v.numpy() for k, v in sig(images=images).items()}
    json_floor = timed(lambda: {k: np.asarray(v) for k, v in _loads(outputs_json(outputs, "columnar").encode())
                                ["outputs"].items()}, max(3, args.requests // 4))
    many = tf.constant([png] * args.clients)
    batch = timed(lambda: sig(images=many), max(2, args.requests // 10))
    arr = np.empty(1, dtype=object)
    arr[:] = [png]
    b64 = [{"b64": __import__("base64").b64encode(png).decode()}]
    p50 = percentile(in_process, 50)
    result = {"model": args.model, "image": "480x560 grey PNG", "requests": args.requests,
              "in_process": {"p50_ms": p50, "p99_ms": percentile(in_process, 99)},
              "rest_json_floor": {"encode_decode_p50_ms": percentile(json_floor, 50),
                                  "rest_p50_ratio_floor": (p50 + percentile(json_floor, 50)) / p50},
              "batch_ceiling": {f"in_process_batch_{args.clients}_ms": percentile(batch, 50),
                                "in_process_batch_speedup": args.clients * p50 / percentile(batch, 50)}}
    if args.model == "segmenter":
        largest = tf.saved_model.load(str(tmp / "segmenter_largest" / "1")).signatures["serving_default"]
        largest(images=images)  # warm-up
        plain, post = [], []
        for _ in range(args.requests):  # alternating, so a drifting host slows both alike
            plain += timed(lambda: sig(images=images), 1)
            post += timed(lambda: largest(images=images), 1)
        from scipy import ndimage

        mask = np.asarray(Image.open(io.BytesIO(sig(images=images)["mask_png_bytes"].numpy()[0]))) > 0
        result["postprocess_largest"] = {
            "none_p50_ms": percentile(plain, 50), "largest_p50_ms": percentile(post, 50),
            "ratio": percentile(post, 50) / percentile(plain, 50), "threshold": threshold,
            "mask_components": int(ndimage.label(mask, structure=np.ones((3, 3), bool))[1])}
    for batching in (False, True):
        proc, gport, rport = start_server(tmp, args.model, batching, tmp)
        try:
            grpc_client = GrpcClient(f"127.0.0.1:{gport}")
            rest_client = RestClient(f"127.0.0.1:{rport}")
            calls = {"grpc": lambda c=grpc_client: c.predict(args.model, {"images": arr}),
                     "rest": lambda c=rest_client: c.predict(args.model, inputs=b64)}
            key = "batching" if batching else "no_batching"
            result[key] = {}
            for proto, call in calls.items():
                entry = {}
                if not batching:
                    lat = timed(call, args.requests)
                    entry.update(p50_ms=percentile(lat, 50), p99_ms=percentile(lat, 99),
                                 p50_ratio_to_in_process=percentile(lat, 50) / result["in_process"]["p50_ms"])
                make = (lambda: (lambda c=GrpcClient(f"127.0.0.1:{gport}"): c.predict(args.model, {"images": arr}))) \
                    if proto == "grpc" else (lambda: (lambda c=RestClient(f"127.0.0.1:{rport}"): c.predict(args.model, inputs=b64)))
                entry[f"throughput_rps_{args.clients}_clients"] = throughput(make, args.clients, args.per_client)
                result[key][proto] = entry
            grpc_client.close()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    k = f"throughput_rps_{args.clients}_clients"
    batch_rps = args.clients / (percentile(batch, 50) / 1000.0)
    for proto in ("grpc", "rest"):
        result[f"{proto}_batching_speedup"] = result["batching"][proto][k] / result["no_batching"][proto][k]
        result["batch_ceiling"][f"{proto}_batching_speedup_ceiling"] = batch_rps / result["no_batching"][proto][k]
    result["targets"] = {"rest_p50_ratio_max": 1.3, "grpc_p50_ratio_max": 1.15, "batching_speedup_min": 2.0}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
