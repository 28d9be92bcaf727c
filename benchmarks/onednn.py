"""oneDNN on against off, side by side, for the training benchmarks.

TensorFlow reads ``TF_ENABLE_ONEDNN_OPTS`` once, when it is imported, so one process cannot
time both. ``--onednn both`` runs the benchmark again in child processes, oneDNN off then on,
for ``--rounds`` rounds (alternating, so that a host whose speed drifts slows both alike), and
reports the median of every number over the rounds and the speed-up of on over off.
``--onednn on`` (the default, as the ``tf-bus`` command runs) and ``off`` time one setting in
this process.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Any

SETTINGS = {"off": "0", "on": "1"}


def add_arguments(ap) -> None:
    ap.add_argument("--onednn", choices=("on", "off", "both"), default="on",
                    help="oneDNN CPU kernels: on (default; what `tf-bus` runs), off (TensorFlow's Eigen kernels), "
                         "or both: child processes alternate off and on for --rounds rounds")
    ap.add_argument("--rounds", type=int, default=3, help="with --onednn both: rounds of off+on (default: 3)")


def apply(choice: str) -> None:
    """Sets TF_ENABLE_ONEDNN_OPTS for ``on``/``off``; call before importing TensorFlow."""
    if choice in SETTINGS:
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = SETTINGS[choice]


def _median_tree(trees: list[Any]) -> Any:
    """The element-wise median of JSON trees of the same shape (non-numbers: the first)."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: _median_tree([t[k] for t in trees]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return round(statistics.median(trees), 4)
    return first


def _speedups(on: Any, off: Any, key: str) -> Any:
    """``on[..][key] / off[..][key]`` wherever ``key`` occurs in the trees."""
    if not isinstance(on, dict):
        return None
    if key in on:
        return round(on[key] / off[key], 3)
    out = {k: _speedups(on[k], off[k], key) for k in on if isinstance(on[k], dict)}
    return {k: v for k, v in out.items() if v is not None} or None


def compare(script: str, argv: list[str], rounds: int, benchmark: str) -> dict[str, Any]:
    """Runs ``script argv --onednn off|on`` ``rounds`` times each, alternating (the appended
    ``--onednn`` wins over one in ``argv``: argparse keeps the last); returns the medians per
    setting, the runs themselves, and the speed-up in training images/s."""
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(rounds):
        for setting in ("off", "on"):
            r = subprocess.run([sys.executable, script, *argv, "--onednn", setting], capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{script} --onednn {setting} failed:\n{r.stderr[-3000:]}")
            runs[setting].append(json.loads(r.stdout))
    medians = {s: _median_tree([run["results"] for run in runs[s]]) for s in runs}
    return {"benchmark": benchmark, "onednn": "both", "rounds": rounds,
            "onednn_active": {s: [run["onednn_active"] for run in runs[s]] for s in runs},
            "median": medians, "onednn_speedup": _speedups(medians["on"], medians["off"], "train_images_per_s"),
            "runs": runs}


def compared(args, script: str, benchmark: str) -> bool:
    """With ``--onednn both``: prints the comparison and returns True (the caller is done).
    Otherwise sets this process's setting (before TensorFlow is imported) and returns False."""
    if args.onednn == "both":
        print(json.dumps(compare(script, sys.argv[1:], args.rounds, benchmark), indent=2))
        return True
    apply(args.onednn)
    return False
