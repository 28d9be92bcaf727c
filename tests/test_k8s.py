"""The Kubernetes examples in docker/k8s: structure checked, the Job's TF_CONFIG script run
for each pod index and parsed as tf-bus parses it, its tf-bus command parsed by the CLI."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tf_bus.cli import build_parser
from tf_bus.training.distribute import parse_tf_config

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "docker" / "k8s"


def docs(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((K8S / name).read_text()) if d}


def test_training_job_is_an_indexed_job_behind_a_headless_service():
    d = docs("training-job.yaml")
    svc, job = d["Service"], d["Job"]
    assert svc["spec"]["clusterIP"] == "None"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"] and pod["restartPolicy"] == "OnFailure"
    assert svc["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    (c,) = pod["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert int(env["WORKERS"]["value"]) == spec["completions"]
    assert "valueFrom" in env["AWS_SECRET_ACCESS_KEY"]  # credentials from a Secret, never inline
    mounts = {m["name"] for m in c["volumeMounts"]}
    assert {v["name"] for v in pod["volumes"]} == mounts


@pytest.mark.parametrize("index", [0, 1])
def test_each_pod_builds_a_tf_config_tf_bus_accepts(index, tmp_path):
    job = docs("training-job.yaml")["Job"]
    c = job["spec"]["template"]["spec"]["containers"][0]
    script = c["args"][0]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    # Run the pod's script up to (not including) the exec: print TF_CONFIG and the command.
    body, exec_line = script.rsplit("exec ", 1)
    probe = body + 'printf "%s" "$TF_CONFIG"'
    out = subprocess.run(["/bin/sh", "-c", probe], capture_output=True, text=True, check=True,
                         env={**env, "JOB_COMPLETION_INDEX": str(index), "PATH": "/usr/bin:/bin"}).stdout
    echoed, printed = out.splitlines()[-2:]  # the pod logs TF_CONFIG=...; the probe prints the value
    assert echoed == f"TF_CONFIG={printed}"
    cfg = parse_tf_config(printed)
    name = job["metadata"]["name"]
    assert cfg["task"] == {"type": "worker", "index": index}
    assert cfg["cluster"]["worker"] == [f"{name}-{i}.{name}:{env['PORT']}" for i in range(int(env["WORKERS"]))]
    argv = shlex.split(exec_line)
    assert argv[0] == "tf-bus"
    args = build_parser().parse_args(argv[1:])
    assert args.strategy == "multiworker" and args.data.startswith("s3://")


def test_serving_deployment_is_scaled_by_an_hpa_and_reads_the_shipped_configs():
    d = docs("serving.yaml")
    dep, svc, hpa = d["Deployment"], d["Service"], d["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"] == labels and svc["spec"]["selector"] == labels
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"].startswith("tensorflow/serving:")
    assert "requests" in c["resources"]  # the HPA's CPU utilisation needs requests
    assert {p["containerPort"] for p in c["ports"]} == {8500, 8501}
    flags = dict(a.lstrip("-").split("=", 1) if "=" in a else (a.lstrip("-"), True) for a in c["args"])
    for flag in ("model_config_file", "batching_parameters_file", "monitoring_config_file"):
        assert (REPO / "serving" / Path(flags[flag]).name).is_file(), flag  # the ConfigMap is made from serving/
    assert flags["allow_version_labels_for_unavailable_models"] == "true"  # models.config's `stable` labels
    model = json.loads(json.dumps(c["readinessProbe"]))["httpGet"]["path"].rsplit("/", 1)[1]
    assert f'name: "{model}"' in (REPO / "serving" / "models.config").read_text()
