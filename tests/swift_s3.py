"""A real S3-compatible object store on 127.0.0.1 for tests: OpenStack Swift with s3api.

One node, one replica, one device under a temp dir: rings built with swift-ring-builder;
account, container, object and proxy servers (workers = 0) as child processes; the proxy
pipeline has s3api + tempauth, so boto3 talks to it as to S3 with access key
``test:tester`` and secret ``testing``. Data lives on disk, so a stopped and restarted
store keeps what it stored.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ACCESS_KEY = "test:tester"
SECRET_KEY = "testing"

_PIPELINE = (
    "catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk "
    "s3api tempauth copy slo dlo proxy-logging proxy-server"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: install the test extra (pip install -e '.[test]') which brings `swift`")
    return found


class SwiftS3:
    """Start with ``start()``, stop with ``stop()``; ``endpoint`` is the S3 URL."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.ports = {k: _free_port() for k in ("proxy", "account", "container", "object")}
        self.endpoint = f"http://127.0.0.1:{self.ports['proxy']}"
        self._procs: dict[str, subprocess.Popen] = {}
        self._configure()

    # ------------------------------------------------------------------ setup
    def _configure(self) -> None:
        etc, node, log = self.root / "etc", self.root / "node", self.root / "log"
        for d in (etc, node / "d1", log):
            d.mkdir(parents=True, exist_ok=True)
        (etc / "swift.conf").write_text(
            "[swift-hash]\nswift_hash_path_suffix = tfbus\nswift_hash_path_prefix = tfbus\n"
            "[storage-policy:0]\nname = gold\ndefault = yes\n"
        )
        common = (
            f"[DEFAULT]\nswift_dir = {etc}\ndevices = {node}\nmount_check = false\n"
            f"bind_ip = 127.0.0.1\nworkers = 0\nlog_level = WARNING\ndisable_fallocate = true\n"
            f"log_address = /nonexistent\nlog_facility = LOG_LOCAL0\n"
        )
        for kind in ("account", "container", "object"):
            (etc / f"{kind}-server.conf").write_text(
                common + f"bind_port = {self.ports[kind]}\n\n"
                f"[pipeline:main]\npipeline = {kind}-server\n\n"
                f"[app:{kind}-server]\nuse = egg:swift#{kind}\n\n"
                f"[{kind}-replicator]\n[{kind}-updater]\n[{kind}-auditor]\n"
            )
            builder = etc / f"{kind}.builder"
            rb = _bin("swift-ring-builder")
            for args in (
                ["create", "6", "1", "1"],
                ["add", f"r1z1-127.0.0.1:{self.ports[kind]}/d1", "1"],
                ["rebalance"],
            ):
                r = subprocess.run([rb, str(builder), *args], capture_output=True, text=True)
                if r.returncode not in (0, 1):  # 1 = "warning" from rebalance
                    raise RuntimeError(f"swift-ring-builder {' '.join(args)} failed: {r.stdout}{r.stderr}")
        (etc / "proxy-server.conf").write_text(
            common + f"bind_port = {self.ports['proxy']}\n\n"
            f"[pipeline:main]\npipeline = {_PIPELINE}\n\n"
            "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n\n"
            "[filter:catch_errors]\nuse = egg:swift#catch_errors\n"
            "[filter:gatekeeper]\nuse = egg:swift#gatekeeper\n"
            "[filter:healthcheck]\nuse = egg:swift#healthcheck\n"
            "[filter:proxy-logging]\nuse = egg:swift#proxy_logging\n"
            "[filter:cache]\nuse = egg:swift#memcache\nmemcache_servers = 127.0.0.1:1\n"
            "[filter:listing_formats]\nuse = egg:swift#listing_formats\n"
            "[filter:bulk]\nuse = egg:swift#bulk\n"
            "[filter:s3api]\nuse = egg:swift#s3api\nlocation = us-east-1\n"
            "[filter:tempauth]\nuse = egg:swift#tempauth\nuser_test_tester = testing .admin\nuser_test_reader = reading\n"
            "[filter:copy]\nuse = egg:swift#copy\n"
            "[filter:slo]\nuse = egg:swift#slo\n"
            "[filter:dlo]\nuse = egg:swift#dlo\n"
        )

    # ------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 30.0) -> "SwiftS3":
        etc = self.root / "etc"
        for kind in ("account", "container", "object", "proxy"):
            if kind in self._procs and self._procs[kind].poll() is None:
                continue
            log = open(self.root / "log" / f"{kind}.log", "ab")
            self._procs[kind] = subprocess.Popen(
                [_bin(f"swift-{kind}-server"), str(etc / f"{kind}-server.conf")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.endpoint + "/healthcheck", timeout=1) as r:
                    if r.status == 200 and self._backends_up():
                        return self
            except OSError:
                pass
            for kind, p in self._procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"swift {kind} server exited: {self.log(kind)[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"swift did not start in {timeout}s: {self.log('proxy')[-2000:]}")
            time.sleep(0.1)

    def _backends_up(self) -> bool:
        for kind in ("account", "container", "object"):
            try:
                socket.create_connection(("127.0.0.1", self.ports[kind]), timeout=0.5).close()
            except OSError:
                return False
        return True

    def stop(self, kind: str | None = None) -> None:
        # The proxy first: clients then see the store go away (connection refused), never a
        # proxy that answers 404 for want of its backends.
        kinds = [kind] if kind else sorted(self._procs, key=lambda k: k != "proxy")
        for k in kinds:
            p = self._procs.pop(k, None)
            if p is None:
                continue
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)

    def log(self, kind: str) -> str:
        path = self.root / "log" / f"{kind}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def object_files(self) -> list[Path]:
        """The .data files on disk: what the store really holds."""
        return sorted((self.root / "node").rglob("*.data"))

    def client(self, **kwargs):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}), **kwargs,
        )
