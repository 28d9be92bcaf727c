"""S3 staging (issue 7) against a real S3-compatible store on loopback: Swift + s3api.

The store runs as real processes with its data on disk (tests/swift_s3.py), so a store
stopped mid-publish and restarted keeps what it stored, and a corrupted object is a
flipped byte in a real ``.data`` file.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import pytest

from swift_s3 import ACCESS_KEY, SECRET_KEY, SwiftS3
from tf_bus import staging
from tf_bus.cli import main
from tf_bus.config import ConfigError, StageConfig
from tf_bus.staging import S3Url, StageError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def swift(tmp_path_factory):
    store = SwiftS3(tmp_path_factory.mktemp("swift")).start()
    yield store
    store.stop()


@pytest.fixture
def s3env(monkeypatch, swift, tmp_path):
    """Credentials and endpoint only through the environment, as users give them."""
    env = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_ENDPOINT_URL": swift.endpoint,
        "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"), "AWS_EC2_METADATA_DISABLED": "true",
        "TF_BUS_CACHE": str(tmp_path / "cache"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return env


@pytest.fixture
def bucket(swift, s3env) -> str:
    name = f"tfbus-{uuid.uuid4().hex[:10]}"
    swift.client().create_bucket(Bucket=name)
    return name


def _config(**kw) -> StageConfig:
    return StageConfig(max_attempts=2, **kw)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): _md5(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def _keys(swift, bucket: str, prefix: str = "") -> dict[str, dict]:
    out = {}
    for page in swift.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.update({o["Key"]: o for o in page.get("Contents", [])})
    return out


# ------------------------------------------------------------------ pure parts


@pytest.mark.parametrize("text, bucket, key, prefix", [
    ("s3://b-1/raw/", "b-1", "raw/", True),
    ("s3://b-1", "b-1", "", True),
    ("s3://b-1/raw/busi.zip", "b-1", "raw/busi.zip", False),
])
def test_parse_s3_url(text, bucket, key, prefix):
    u = staging.parse_s3_url(text)
    assert (u.bucket, u.key, u.is_prefix) == (bucket, key, prefix)
    assert str(u) == f"s3://{bucket}/{key}"


@pytest.mark.parametrize("text, message", [
    ("/local/path", "not an S3 URL"),
    ("s3:///raw/", "has no bucket"),
    ("s3://b/raw/../x", "'..' are not allowed"),
])
def test_parse_s3_url_refuses(text, message):
    with pytest.raises(StageError, match=message):
        staging.parse_s3_url(text)


@pytest.mark.parametrize("kwargs, field", [
    ({"endpoint_url": "localhost:9000"}, "endpoint_url"),
    ({"multipart_chunk_mb": 4}, "multipart_chunk_mb"),
    ({"multipart_threshold_mb": 5, "multipart_chunk_mb": 8}, "multipart_threshold_mb"),
    ({"max_attempts": 0}, "max_attempts"),
    ({"retry_mode": "fast"}, "retry_mode"),
])
def test_stage_config_validation(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        StageConfig(**kwargs)


def _zip(path: Path, members: list[tuple[str, bytes, int]], compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            info.compress_type = compression
            zf.writestr(info, data)
    return path


REG = stat.S_IFREG | 0o644


@pytest.mark.parametrize("members, compression, limit_mb, message", [
    ([("/etc/evil", b"x", REG)], zipfile.ZIP_STORED, 10, "absolute path"),
    ([("ok/../../evil", b"x", REG)], zipfile.ZIP_STORED, 10, r"climbs out"),
    ([("C:\\evil", b"x", REG)], zipfile.ZIP_STORED, 10, "absolute path"),
    ([("link", b"/etc/passwd", stat.S_IFLNK | 0o777)], zipfile.ZIP_STORED, 10, "symbolic link"),
    ([("a", b"\0" * (2 << 20), REG)], zipfile.ZIP_STORED, 1, "more than 1 MiB"),
    ([("bomb", b"\0" * (8 << 20), REG)], zipfile.ZIP_DEFLATED, 100, "expands"),
])
def test_safe_unzip_refuses(tmp_path, members, compression, limit_mb, message):
    z = _zip(tmp_path / "bad.zip", members, compression)
    dest = tmp_path / "out"
    with pytest.raises(StageError, match=message):
        staging.safe_unzip(z, dest, StageConfig(max_unzip_mb=limit_mb))
    assert not dest.exists()  # nothing half-written
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_safe_unzip_refuses_a_member_longer_than_its_header(tmp_path):
    z = _zip(tmp_path / "lie.zip", [("a.png", b"A" * 1000, REG)])
    raw = bytearray(z.read_bytes())
    # Shrink the declared uncompressed size (local header and central directory) to 10.
    import struct
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        i = raw.index(sig)
        raw[i + off:i + off + 4] = struct.pack("<I", 10)
    z.write_bytes(bytes(raw))
    with pytest.raises(StageError, match="more bytes than its header|is corrupt"):
        staging.safe_unzip(z, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_safe_unzip_keeps_the_tree_and_skips_mac_litter(tmp_path):
    z = _zip(tmp_path / "good.zip", [("D/benign/a.png", b"png", REG), ("__MACOSX/D/._a.png", b"junk", REG),
                                     ("D/.DS_Store", b"junk", REG), ("D/normal/b.png", b"png2", REG)])
    out = staging.safe_unzip(z, tmp_path / "out")
    assert _tree(out) == {"D/benign/a.png": hashlib.md5(b"png").hexdigest(),
                          "D/normal/b.png": hashlib.md5(b"png2").hexdigest()}


def _client_error(code: str, status: int = 400, **extra):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m", **extra},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize("make, needles", [
    (lambda: _client_error("ExpiredToken"), ["expired", "refresh", "run the same command again"]),
    (lambda: _client_error("NoSuchBucket", 404), ["does not exist", "aws s3 mb s3://bkt"]),
    (lambda: _client_error("AccessDenied", 403), ["access denied", "--profile"]),
    (lambda: _client_error("InvalidAccessKeyId", 403), ["access key is not known", "AWS_ACCESS_KEY_ID"]),
    (lambda: _client_error("SignatureDoesNotMatch", 403, AWSAccessKeyId="AKIASECRETID", StringToSign="sts"),
     ["secret key does not match", "AWS_SECRET_ACCESS_KEY"]),
    (lambda: _client_error("RequestTimeTooSkewed", 403), ["clock"]),
    (lambda: __import__("botocore.exceptions").exceptions.NoCredentialsError(), ["no AWS credentials", "never pass keys"]),
    (lambda: __import__("botocore.exceptions").exceptions.EndpointConnectionError(endpoint_url="http://x:1"),
     ["cannot reach", "--endpoint-url"]),
])
def test_explain_s3_error(make, needles):
    e = staging.explain_s3_error(make(), S3Url("bkt", "ready/"))
    assert isinstance(e, StageError)
    for n in needles:
        assert n in str(e)
    assert "AKIASECRETID" not in str(e) and "sts" not in str(e).split("[")[0].split()


# --------------------------------------------------------- against the store


def test_five_steps_end_to_end_then_nothing_to_do(swift, bucket, synthetic_release, tmp_path, capsys):
    base = f"s3://{bucket}/busi/"
    argv = ["stage", "all", str(synthetic_release), base, "--work", str(tmp_path / "work"), "--quiet", "--retries", "2"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in first] == ["upload", "fetch", "prepare", "publish"]
    assert first[0]["uploaded"] == 1 and first[1]["downloaded"] == 1
    prepared = tmp_path / "work" / "prepared"
    keys = _keys(swift, bucket)
    assert f"busi/raw/{synthetic_release.name}.zip" in keys
    manifest = json.loads(swift.client().get_object(Bucket=bucket, Key="busi/ready/manifest.json")["Body"].read())
    local = _tree(prepared)
    assert {e["path"]: e["md5"] for e in manifest["files"]} == local
    assert manifest["prepare"] == json.loads((prepared / "manifest.json").read_text())
    assert first[3]["uploaded"] == len(local)
    # The fetched release is byte-identical to the source.
    assert _tree(Path(first[1]["local"])) == _tree(synthetic_release)
    # Every published object holds exactly the local bytes.
    for e in manifest["files"]:
        assert keys[f"busi/ready/{e['key']}"]["Size"] == e["size"]
        assert keys[f"busi/ready/{e['key']}"]["ETag"].strip('"') == e["md5"]

    on_disk = len(swift.object_files())
    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out)
    assert second[0]["uploaded"] == 0 and second[0]["skipped"] == 1
    assert second[1]["downloaded"] == 0
    assert second[2]["skipped"] == 1
    assert second[3]["uploaded"] == 0 and second[3]["skipped"] == len(local)
    assert len(swift.object_files()) == on_disk  # the store got no new object

    # A reader stages exactly what was published.
    staged = staging.stage_dataset(base + "ready/", _config())
    assert _tree(staged) == local
    assert staging.stage_dataset(base + "ready/", _config()) == staged  # cached, complete


def test_training_command_reads_an_s3_publish(swift, bucket, prepared, tmp_path, capsys):
    assert staging.publish(prepared, f"s3://{bucket}/ready/", _config(), quiet=True).uploaded > 0
    run = tmp_path / "run"
    rc = main(["train-segmenter", "--data", f"s3://{bucket}/ready/", "--out", str(run), "--epochs", "1",
               "--image-size", "32,32", "--depth", "2", "--base-filters", "4", "--batch-size", "8", "--quiet",
               "--cache-dir", str(tmp_path / "c"), "--retries", "2", "--no-diagnostics"])
    assert rc == 0, capsys.readouterr().err
    staged = tmp_path / "c" / bucket / "ready"
    assert _tree(staged) == _tree(prepared)
    assert (run / "best.keras").is_file()


def test_publish_interrupted_by_the_store_stopping_then_finished(swift, bucket, prepared, s3env, tmp_path):
    """The store dies mid-publish: no manifest is visible, what is there is whole, a re-run finishes."""
    dest = f"s3://{bucket}/ready/"
    total = len(_tree(prepared))
    before = len(swift.object_files())
    env = {**os.environ, **s3env, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "tf_bus.cli", "stage", "publish", str(prepared), dest,
                             "--concurrency", "1", "--retries", "1", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while len(swift.object_files()) < before + total // 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "publish finished before the store could be stopped"
    swift.stop()
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        swift.start()  # whatever happens, later tests get their store back
    assert proc.returncode == 2, err
    assert "cannot reach" in err and "run the same command again" in err
    assert "Traceback" not in err
    keys = _keys(swift, bucket, "ready/")
    assert "ready/manifest.json" not in keys
    assert 0 < len(keys) < total
    local = {e: m for e, m in _tree(prepared).items()}
    for key, o in keys.items():  # every visible object is whole and right
        rel = key[len("ready/"):]
        rel = "manifest.json" if rel == staging.PREPARE_REPORT_KEY else rel
        assert o["ETag"].strip('"') == local[rel]
    with pytest.raises(StageError, match="manifest.json not found"):
        staging.stage_dataset(dest, _config())

    report = staging.publish(prepared, dest, _config(), quiet=True)
    assert report.skipped == len(keys) and report.uploaded == total - len(keys)
    assert _tree(staging.stage_dataset(dest, _config())) == _tree(prepared)


def test_multipart_upload_resumes_an_interrupted_one(swift, bucket, tmp_path):
    """An interrupted run left 2 of 4 parts: a re-run sends only the other 2, then completes."""
    cfg = _config(multipart_threshold_mb=5, multipart_chunk_mb=5)
    src = tmp_path / "raw.zip"
    rng = __import__("numpy").random.default_rng(0)
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("Dataset_BUSI_with_GT/benign/noise.bin", rng.bytes(17 << 20))
    digest = staging.digest_file(src, cfg)
    assert len(digest.part_md5s) == 4
    c = swift.client()
    key = "raw/raw.zip"
    # What an interrupted run leaves: an open upload with parts 1 and 2 ...
    up = c.create_multipart_upload(Bucket=bucket, Key=key, Metadata={staging.MD5_META: digest.md5})["UploadId"]
    with open(src, "rb") as f:
        for n in (1, 2):
            c.upload_part(Bucket=bucket, Key=key, UploadId=up, PartNumber=n, Body=f.read(5 << 20))
    # ... and an older one for other content, which must be cleaned up.
    stale = c.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    c.upload_part(Bucket=bucket, Key=key, UploadId=stale, PartNumber=1, Body=b"y" * (5 << 20))
    with pytest.raises(Exception):
        c.head_object(Bucket=bucket, Key=key)  # nothing visible before completion

    client = staging.make_client(StageConfig(endpoint_url=swift.endpoint, max_attempts=2))
    sent = []
    client.meta.events.register("before-call.s3.UploadPart", lambda params, **kw: sent.append(params["url_path"]))
    report = staging.upload(src, f"s3://{bucket}/raw/", cfg, quiet=True, client=client)
    assert report.uploaded == 1 and len(sent) == 2
    head = c.head_object(Bucket=bucket, Key=key)
    assert head["ETag"].strip('"') == digest.etag and head["ContentLength"] == digest.size
    assert c.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    # Fetch verifies the multipart object and unzips it.
    r = staging.fetch(f"s3://{bucket}/raw/", tmp_path / "fetched", cfg, quiet=True)
    assert _md5(tmp_path / "fetched" / "raw.zip") == digest.md5
    assert (Path(r.local) / "benign" / "noise.bin").stat().st_size == 17 << 20
    # Again: nothing moves.
    sent.clear()
    assert staging.upload(src, f"s3://{bucket}/raw/", cfg, quiet=True, client=client).skipped == 1 and not sent


def test_corrupted_object_is_detected(swift, bucket, prepared, tmp_path):
    dest = f"s3://{bucket}/ready/"
    earlier = set(swift.object_files())  # other tests stored the same bytes in other buckets
    staging.publish(prepared, dest, _config(), quiet=True)
    victim = prepared / "splits.json"
    data = victim.read_bytes()
    stored = [p for p in set(swift.object_files()) - earlier if p.read_bytes() == data]
    assert len(stored) == 1
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF
    stored[0].write_bytes(bytes(bad))  # bit rot in the store, same size
    out = tmp_path / "staged"
    with pytest.raises(StageError, match=r"splits.json: checksum mismatch after download"):
        staging.stage_dataset(dest, _config(), dest=out)
    assert not (out / "splits.json").exists()  # the corrupt bytes were not kept
    assert not (out / ".tf_bus_stage.json").exists()  # not marked complete


def test_corrupted_raw_zip_is_detected_on_fetch(swift, bucket, synthetic_release, tmp_path):
    earlier = set(swift.object_files())
    r = staging.upload(synthetic_release, f"s3://{bucket}/raw/", _config(), quiet=True)
    digest = r.details["md5"]
    stored = [p for p in set(swift.object_files()) - earlier if hashlib.md5(p.read_bytes()).hexdigest() == digest]
    assert len(stored) == 1
    bad = bytearray(stored[0].read_bytes())
    bad[100] ^= 0xFF
    stored[0].write_bytes(bytes(bad))
    with pytest.raises(StageError, match="checksum mismatch"):
        staging.fetch(f"s3://{bucket}/raw/", tmp_path / "f", _config(), quiet=True)
    assert not list((tmp_path / "f").glob("*.zip")) if (tmp_path / "f").exists() else True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["unknown bucket", "access denied", "wrong endpoint", "wrong secret",
                                  "missing local path", "nothing published", "not a prepare output"])
def test_stage_errors_are_named_with_the_fix(case, swift, bucket, s3env, monkeypatch, prepared, tmp_path, capsys):
    argv, needles = {
        "unknown bucket": (["stage", "publish", str(prepared), "s3://no-such-bucket-x/ready/"],
                           ["no-such-bucket-x", "does not exist", "aws s3 mb"]),
        "access denied": (["stage", "publish", str(prepared), f"s3://{bucket}/ready/"], ["access denied", bucket]),
        "wrong endpoint": (["stage", "fetch", f"s3://{bucket}/raw/", str(tmp_path / "f"),
                            "--endpoint-url", f"http://127.0.0.1:{_free_port()}"], ["cannot reach", "--endpoint-url"]),
        "wrong secret": (["stage", "publish", str(prepared), f"s3://{bucket}/ready/"],
                         ["secret key does not match", "AWS_SECRET_ACCESS_KEY"]),
        "missing local path": (["stage", "upload", str(tmp_path / "nope.zip"), f"s3://{bucket}/raw/"],
                               ["nope.zip", "no such file or folder"]),
        "nothing published": (["evaluate-segmenter", str(tmp_path / "run"), "--data", f"s3://{bucket}/empty/"],
                              ["manifest.json not found", "stage publish"]),
        "not a prepare output": (["stage", "publish", str(tmp_path), f"s3://{bucket}/ready/"],
                                 ["not a `tf-bus prepare` output"]),
    }[case]
    if case == "access denied":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test:reader")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "reading")
    if case == "wrong secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    assert main(argv + ["--retries", "1", "--quiet"] if "stage" in argv else argv + ["--retries", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    assert "not-the-secret" not in err and SECRET_KEY not in err


def test_a_replaced_publish_hides_the_old_manifest_until_complete(swift, bucket, prepared, tmp_path):
    """Publishing other content over a prefix deletes the old manifest first."""
    import shutil

    dest = f"s3://{bucket}/ready/"
    staging.publish(prepared, dest, _config(), quiet=True)
    changed = tmp_path / "changed"
    shutil.copytree(prepared, changed)
    (changed / "classification" / "test" / "benign" / "extra.png").write_bytes(b"not really a png")
    seen = []
    client = staging.make_client(_config())

    def on_put(params, **kw):
        seen.append(("manifest" if params["url_path"].endswith("manifest.json") else "file",
                     "ready/manifest.json" in _keys(swift, bucket, "ready/")))

    client.meta.events.register("before-call.s3.PutObject", on_put)
    staging.publish(changed, dest, _config(), quiet=True, client=client)
    # While the new file went up, no manifest was visible; the new manifest came last.
    assert seen[0] == ("file", False) and seen[-1][0] == "manifest"
    assert [s for s in seen if s[0] == "manifest"] == [seen[-1]]
    assert _tree(staging.stage_dataset(dest, _config(), dest=tmp_path / "s")) == _tree(changed)


@pytest.mark.slow
@pytest.mark.real_data
def test_stage_real_busi(swift, bucket, real_busi, real_prepared, tmp_path):
    """The real release: zipped on the fly (multipart), fetched byte-identical; its layouts published and read back."""
    cfg = _config()
    up = staging.upload(real_busi, f"s3://{bucket}/busi/raw/", cfg, quiet=True)
    assert up.uploaded == 1 and up.details["etag"].endswith(f"-{-(-up.bytes // (8 << 20))}")
    got = staging.fetch(f"s3://{bucket}/busi/raw/", tmp_path / "raw", cfg, quiet=True)
    assert _tree(Path(got.local)) == _tree(real_busi)
    pub = staging.publish(real_prepared, f"s3://{bucket}/busi/ready/", cfg, quiet=True)
    assert pub.uploaded == len(_tree(real_prepared))
    assert staging.publish(real_prepared, f"s3://{bucket}/busi/ready/", cfg, quiet=True).uploaded == 0
    staged = staging.stage_dataset(f"s3://{bucket}/busi/ready/", cfg, dest=tmp_path / "staged")
    assert _tree(staged) == _tree(real_prepared)


@pytest.mark.parametrize("algorithm", ["SHA256", "CRC32"])
def test_additional_checksum_is_sent_and_accepted(swift, bucket, tmp_path, algorithm):
    """--checksum-algorithm: every PUT and part carries x-amz-checksum-*; the store checks it."""
    cfg = _config(multipart_threshold_mb=5, multipart_chunk_mb=5, checksum_algorithm=algorithm)
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w") as zf:
        zf.writestr("Dataset_BUSI_with_GT/benign/noise.bin", __import__("numpy").random.default_rng(1).bytes(11 << 20))
    client = staging.make_client(cfg)
    headers = []
    client.meta.events.register("before-send.s3.*", lambda request, **kw: headers.append(
        (request.method, {k.lower(): v for k, v in request.headers.items()})))
    staging.upload(big, f"s3://{bucket}/raw/", cfg, quiet=True, client=client)
    sent = [h for m, h in headers if m == "PUT"]
    assert len(sent) == 3  # three parts
    name = f"x-amz-checksum-{algorithm.lower()}"
    assert all(name in h or name in str(h.get("x-amz-trailer", "")) for h in sent), sent
    r = staging.fetch(f"s3://{bucket}/raw/", tmp_path / "f", cfg, quiet=True, client=client)
    assert (Path(r.local) / "benign" / "noise.bin").stat().st_size == 11 << 20
    small = _zip(tmp_path / "small.zip", [("D/benign/a.png", b"png", REG)])
    headers.clear()
    staging.upload(small, f"s3://{bucket}/raw-small/", cfg, quiet=True, client=client)
    (put,) = [h for m, h in headers if m == "PUT"]
    assert name in put or name in str(put.get("x-amz-trailer", ""))
