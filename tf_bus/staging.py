"""S3 staging with boto3: the original pipeline's five data steps, safe to interrupt.

The steps, in data-flow order (each a library function, each a ``tf-bus stage`` command):

1. ``upload``  — the raw BUSI release (a zip, or a folder zipped on the fly) to
   ``s3://BUCKET/PREFIX/raw/``.
2. ``fetch``   — download it, verify it, unzip it safely.
3. + 4. ``prepare`` — the foundation's ``prepare`` (structure + leak-free split).
5. ``publish`` — both layouts and the split to ``s3://BUCKET/PREFIX/ready/``, with a
   ``manifest.json`` written last: a reader (``stage_dataset``, i.e. training on an
   ``s3://`` path) only trusts what a complete manifest lists.

Integrity: single-part objects go up with ``Content-MD5`` (the store refuses a body that
does not match) and are checked by ETag; multipart objects by the multipart ETag
(MD5 of the parts' MD5s, ``-N``); every object also carries its whole-content MD5 in
``x-amz-meta-tf-bus-md5``, and every download is hashed and compared before it is
renamed into place. Re-running a step skips what is already there and identical, and
finishes an interrupted multipart upload from its last part.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from tf_bus.config import PrepareConfig, StageConfig
from tf_bus.data.busi import TfBusError
from tf_bus.io import atomic_directory, write_json_atomic

MB = 1024 * 1024
#: Metadata key holding an object's whole-content MD5 (``x-amz-meta-tf-bus-md5``).
MD5_META = "tf-bus-md5"
#: The publish manifest; written last, read first.
MANIFEST = "manifest.json"
#: ``tf-bus prepare`` writes its own ``manifest.json``; it is published under this key.
PREPARE_REPORT_KEY = "prepare_manifest.json"
PUBLISH_FORMAT = "tf-bus-publish/1"
_FETCH_MARKER = ".tf_bus_fetch.json"
_STAGE_MARKER = ".tf_bus_stage.json"
_SKIP_ZIP_MEMBERS = ("__MACOSX/",)


class StageError(TfBusError):
    """A staging step failed; the message names the object or file and the fix."""


# --------------------------------------------------------------------------- URLs


@dataclass(frozen=True)
class S3Url:
    """``s3://bucket/key``; a key that is empty or ends with ``/`` is a prefix."""

    bucket: str
    key: str = ""

    @property
    def is_prefix(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    def child(self, name: str) -> "S3Url":
        base = self.key if self.is_prefix else self.key + "/"
        return S3Url(self.bucket, base + name)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_s3_url(text: str) -> S3Url:
    """Parses ``s3://bucket[/key]``; anything else is a ``StageError`` naming the value."""
    if not isinstance(text, str) or not text.startswith("s3://"):
        raise StageError(f"{text!r} is not an S3 URL: write it as s3://BUCKET/PREFIX/")
    rest = text[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StageError(f"{text!r} has no bucket: write it as s3://BUCKET/PREFIX/")
    if any(part in ("..", ".") for part in key.split("/")):
        raise StageError(f"{text!r}: '.' and '..' are not allowed in keys")
    return S3Url(bucket, key)


def is_s3_url(text: Any) -> bool:
    return isinstance(text, str) and text.startswith("s3://")


# ------------------------------------------------------------------------ client


def make_client(config: StageConfig | None = None):
    """A boto3 S3 client: the usual credential chain, botocore retries with backoff."""
    import boto3
    import botocore.config
    import botocore.exceptions

    config = config or StageConfig()
    try:
        session = boto3.session.Session(profile_name=config.profile, region_name=config.region)
    except botocore.exceptions.ProfileNotFound:
        raise StageError(
            f"AWS profile {config.profile!r} is not in ~/.aws/config or ~/.aws/credentials: "
            "add it (aws configure --profile NAME) or pass another --profile"
        ) from None
    bc = botocore.config.Config(
        retries={"max_attempts": config.max_attempts, "mode": config.retry_mode},
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        max_pool_connections=max(10, 2 * config.max_concurrency),
        s3={"addressing_style": "path"} if (config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")) else None,
        # Only send S3's additional checksums when asked (checksum_algorithm): MinIO, Ceph
        # and Swift versions in the field reject or ignore them; Content-MD5 covers integrity.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_supported" if config.checksum_algorithm else "when_required",
    )
    return session.client("s3", endpoint_url=config.endpoint_url, config=bc,
                          region_name=config.region or session.region_name or "us-east-1")


def _endpoint(client) -> str:
    return getattr(client.meta, "endpoint_url", "?")


#: Error code -> (what it means, how to fix it). ``{url}``/``{endpoint}`` are filled in.
_EXPLAIN: dict[str, str] = {
    "NoSuchBucket": "bucket {bucket!r} does not exist at {endpoint}: create it (aws s3 mb s3://{bucket}) "
                    "or fix the URL",
    "AccessDenied": "access denied to {url}: the credentials in use may not read/write this bucket; "
                    "check the IAM policy or bucket policy, or use another --profile",
    "AllAccessDisabled": "access to {url} is disabled for these credentials",
    "InvalidAccessKeyId": "the access key is not known to {endpoint}: check AWS_ACCESS_KEY_ID / "
                          "~/.aws/credentials, or --profile, or --endpoint-url",
    "SignatureDoesNotMatch": "{endpoint} rejected the request signature: the secret key does not match the "
                             "access key (check AWS_SECRET_ACCESS_KEY / ~/.aws/credentials or --profile)",
    "ExpiredToken": "the credentials have expired: refresh them (aws sso login, a new session token, "
                    "or re-assume the role) and run the same command again; finished objects are kept",
    "ExpiredTokenException": "the credentials have expired: refresh them (aws sso login, a new session "
                             "token, or re-assume the role) and run the same command again",
    "TokenRefreshRequired": "the credentials have expired: refresh them and run the same command again",
    "RequestExpired": "the request expired before it reached {endpoint}: check this machine's clock, "
                      "then run the same command again",
    "RequestTimeTooSkewed": "this machine's clock differs too much from {endpoint}'s: fix the clock "
                            "(NTP), then run the same command again",
    "InvalidBucketName": "{bucket!r} is not a valid bucket name (3-63 lowercase letters, digits, dots, "
                         "hyphens)",
    "NoSuchKey": "{url} does not exist: check the key (aws s3 ls {url})",
    "404": "{url} does not exist: check the bucket and key (aws s3 ls s3://{bucket}/)",
    "403": "access denied to {url}: the credentials in use may not read it; check the policy or --profile",
    "BadDigest": "{url}: the store received different bytes than were sent (Content-MD5 mismatch); "
                 "run the same command again",
    "InvalidDigest": "{url}: the store could not check the Content-MD5; run the same command again",
    "SlowDown": "{endpoint} is throttling requests: run again later or lower --concurrency",
    "ServiceUnavailable": "{endpoint} is unavailable: run the same command again later; finished objects "
                          "are kept",
    "InternalError": "{endpoint} had an internal error: run the same command again",
}


def explain_s3_error(exc: BaseException, url: S3Url | str, client=None) -> StageError:
    """Turns a botocore exception into a ``StageError`` that names the object and the fix.

    Never includes credentials (botocore's signature errors echo the access key id and
    the string to sign; only the code and our explanation are kept).
    """
    import botocore.exceptions as be

    url_s = str(url)
    bucket = url.bucket if isinstance(url, S3Url) else url_s[5:].split("/", 1)[0]
    endpoint = _endpoint(client) if client is not None else os.environ.get("AWS_ENDPOINT_URL", "the S3 endpoint")
    fmt = dict(url=url_s, bucket=bucket, endpoint=endpoint)
    if isinstance(exc, be.NoCredentialsError):
        return StageError(
            f"no AWS credentials found for {url_s}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE / --profile with ~/.aws/credentials (never pass keys on the command line)"
        )
    if isinstance(exc, (be.EndpointConnectionError, be.ConnectTimeoutError, be.ConnectionClosedError)):
        return StageError(
            f"cannot reach {endpoint} for {url_s} (after retries): check --endpoint-url / AWS_ENDPOINT_URL "
            "and that the store is running; run the same command again to finish, nothing half-written "
            "is visible"
        )
    if isinstance(exc, be.ReadTimeoutError):
        return StageError(f"{endpoint} stopped answering while transferring {url_s}: run the same command "
                          "again to finish")
    if isinstance(exc, (be.SSLError,)):
        return StageError(f"TLS error talking to {endpoint}: check the URL scheme (http:// vs https://) "
                          "and AWS_CA_BUNDLE")
    if isinstance(exc, be.ClientError):
        err = exc.response.get("Error", {}) or {}
        code = str(err.get("Code", "")) or str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        op = getattr(exc, "operation_name", "request")
        if code in _EXPLAIN:
            return StageError(f"{op} {url_s}: {_EXPLAIN[code].format(**fmt)} [{code}]")
        return StageError(f"{op} {url_s} failed at {endpoint}: {code} {err.get('Message', '')}".rstrip())
    if isinstance(exc, be.BotoCoreError):
        return StageError(f"{url_s}: {type(exc).__name__}: {exc} (endpoint {endpoint})")
    return StageError(f"{url_s}: {exc}")


@contextlib.contextmanager
def _s3_errors(url: S3Url | str, client) -> Iterator[None]:
    import botocore.exceptions as be

    try:
        yield
    except (be.BotoCoreError, be.ClientError) as e:
        raise explain_s3_error(e, url, client) from None


# ----------------------------------------------------------------------- hashing


@dataclass(frozen=True)
class FileDigest:
    """A local file's size, MD5 and the ETag S3 gives it when uploaded with our settings."""

    size: int
    md5: str
    etag: str  # plain MD5, or the multipart ETag "<md5 of part md5s>-N"
    part_md5s: tuple[str, ...] = ()


def digest_file(path: str | os.PathLike, config: StageConfig) -> FileDigest:
    """Hashes ``path`` once: whole-file MD5 and, above the threshold, each part's MD5."""
    size = os.path.getsize(path)
    whole = hashlib.md5()
    multipart = size >= config.multipart_threshold_mb * MB
    chunk = config.multipart_chunk_mb * MB
    parts: list[str] = []
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            whole.update(block)
            if multipart:
                parts.append(hashlib.md5(block).hexdigest())
    if multipart:
        etag = hashlib.md5(b"".join(bytes.fromhex(p) for p in parts)).hexdigest() + f"-{len(parts)}"
    else:
        etag = whole.hexdigest()
    return FileDigest(size, whole.hexdigest(), etag, tuple(parts))


def multipart_etag(path: str | os.PathLike, part_size: int) -> str:
    parts = []
    with open(path, "rb") as f:
        while block := f.read(part_size):
            parts.append(hashlib.md5(block).digest())
    return hashlib.md5(b"".join(parts)).hexdigest() + f"-{len(parts)}"


def _clean_etag(etag: str | None) -> str:
    return (etag or "").strip('"')


def _remote_md5(head: dict) -> str | None:
    """The whole-content MD5 a HEAD tells: our metadata, else a plain (non-KMS) ETag."""
    meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
    if MD5_META in meta:
        return meta[MD5_META]
    etag = _clean_etag(head.get("ETag"))
    if "-" not in etag and len(etag) == 32 and head.get("ServerSideEncryption") != "aws:kms":
        return etag
    return None


def _same_content(remote_size: int, remote_etag: str, remote_md5: str | None, local: FileDigest) -> bool:
    if remote_size != local.size:
        return False
    return _clean_etag(remote_etag) == local.etag or (remote_md5 is not None and remote_md5 == local.md5)


# ---------------------------------------------------------------------- progress


class _Progress:
    """A byte progress bar (tqdm), thread-safe, silent when ``quiet``."""

    def __init__(self, total: int, desc: str, quiet: bool):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                         disable=quiet, leave=True, dynamic_ncols=True)
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


# --------------------------------------------------------------------- uploading


def _checksum_args(config: StageConfig) -> dict:
    return {"ChecksumAlgorithm": config.checksum_algorithm} if config.checksum_algorithm else {}


def _put_small(client, url: S3Url, path: Path, digest: FileDigest, progress: _Progress | None,
               config: StageConfig) -> str:
    data = Path(path).read_bytes()
    if len(data) != digest.size or hashlib.md5(data).hexdigest() != digest.md5:
        raise StageError(f"{path}: changed while it was being uploaded; run the same command again")
    resp = client.put_object(
        Bucket=url.bucket, Key=url.key, Body=data,
        ContentMD5=base64.b64encode(bytes.fromhex(digest.md5)).decode(),
        Metadata={MD5_META: digest.md5}, **_checksum_args(config),
    )
    if progress:
        progress.update(len(data))
    return _clean_etag(resp.get("ETag"))


def _put_multipart(client, url: S3Url, path: Path, digest: FileDigest, config: StageConfig,
                   progress: _Progress | None) -> str:
    """A multipart upload that resumes an interrupted one for the same key.

    Parts already in the store whose ETag equals the local part's MD5 (and that carry the
    additional checksum, when one is asked for) are kept; the rest are (re-)uploaded in
    parallel with Content-MD5. Nothing is visible under the key until
    ``CompleteMultipartUpload``.
    """
    chunk = config.multipart_chunk_mb * MB
    ck = f"Checksum{config.checksum_algorithm}" if config.checksum_algorithm else None
    upload_id, have = _resumable_upload(client, url, digest, ck)
    if upload_id is None:
        upload_id = client.create_multipart_upload(
            Bucket=url.bucket, Key=url.key, Metadata={MD5_META: digest.md5}, **_checksum_args(config))["UploadId"]
        have = {}

    def send(i: int) -> dict:
        number = i + 1
        if number in have:
            if progress:
                progress.update(min(chunk, digest.size - i * chunk))
            return have[number]
        with open(path, "rb") as f:
            f.seek(i * chunk)
            block = f.read(chunk)
        if hashlib.md5(block).hexdigest() != digest.part_md5s[i]:
            raise StageError(f"{path}: changed while it was being uploaded; run the same command again")
        r = client.upload_part(Bucket=url.bucket, Key=url.key, UploadId=upload_id, PartNumber=number,
                               Body=block, ContentMD5=base64.b64encode(bytes.fromhex(digest.part_md5s[i])).decode(),
                               **_checksum_args(config))
        if progress:
            progress.update(len(block))
        part = {"PartNumber": number, "ETag": f'"{_clean_etag(r.get("ETag"))}"'}
        if ck and r.get(ck):
            part[ck] = r[ck]
        return part

    with cf.ThreadPoolExecutor(config.max_concurrency) as pool:
        parts = sorted(pool.map(send, range(len(digest.part_md5s))), key=lambda p: p["PartNumber"])
    for p in parts:
        if _clean_etag(p["ETag"]) != digest.part_md5s[p["PartNumber"] - 1]:
            raise StageError(f"{url}: part {p['PartNumber']} arrived with ETag {p['ETag']}, expected "
                             f"{digest.part_md5s[p['PartNumber'] - 1]}; run the same command again")
    resp = client.complete_multipart_upload(Bucket=url.bucket, Key=url.key, UploadId=upload_id,
                                            MultipartUpload={"Parts": parts})
    return _clean_etag(resp.get("ETag"))


def _resumable_upload(client, url: S3Url, digest: FileDigest, ck: str | None) -> tuple[str | None, dict[int, dict]]:
    """An unfinished multipart upload of ``url.key`` whose parts match ours, if any.

    Returns its id and the reusable parts (number -> the part entry for completion).
    Unfinished uploads of the key that do not match (another file's parts) are aborted,
    so that an interrupted run never leaves storage behind.
    """
    found: str | None = None
    have: dict[int, dict] = {}
    paginator = client.get_paginator("list_multipart_uploads")
    candidates = []
    for page in paginator.paginate(Bucket=url.bucket, Prefix=url.key):
        candidates += [u for u in page.get("Uploads", []) if u["Key"] == url.key]
    for u in sorted(candidates, key=lambda u: u.get("Initiated", 0), reverse=True):
        parts: dict[int, dict] = {}
        matches = True
        for page in client.get_paginator("list_parts").paginate(Bucket=url.bucket, Key=url.key,
                                                                UploadId=u["UploadId"]):
            for p in page.get("Parts", []):
                n, etag = p["PartNumber"], _clean_etag(p["ETag"])
                if n > len(digest.part_md5s) or etag != digest.part_md5s[n - 1]:
                    matches = False
                elif ck is None or p.get(ck):
                    parts[n] = {"PartNumber": n, "ETag": f'"{etag}"', **({ck: p[ck]} if ck else {})}
        if found is None and matches and parts:
            found, have = u["UploadId"], parts
        else:
            with contextlib.suppress(Exception):
                client.abort_multipart_upload(Bucket=url.bucket, Key=url.key, UploadId=u["UploadId"])
    return found, have


def upload_file(client, path: str | os.PathLike, url: S3Url, config: StageConfig, *,
                digest: FileDigest | None = None, progress: _Progress | None = None,
                known_missing: bool = False) -> bool:
    """Uploads one file unless the same content is already at ``url``; verifies after.

    ``known_missing``: the caller listed the prefix and knows the object is absent or
    different (no HEAD first). Returns True if it uploaded, False if it skipped.
    """
    path = Path(path)
    digest = digest or digest_file(path, config)
    with _s3_errors(url, client):
        head = None if known_missing else _head(client, url)
        if head is not None and _same_content(head["ContentLength"], head.get("ETag", ""), _remote_md5(head), digest):
            if progress:
                progress.update(digest.size)
            return False
        if not digest.part_md5s:
            # The store checked the body against Content-MD5; its ETag must be that MD5.
            etag = _put_small(client, url, path, digest, progress, config)
            if etag != digest.md5:
                raise StageError(f"{url}: checksum mismatch after upload (ETag {etag}, expected {digest.md5}); "
                                 "run the same command again")
            return True
        etag = _put_multipart(client, url, path, digest, config, progress)
        after = _head(client, url)
    if after is None:
        raise StageError(f"{url}: uploaded but not found afterwards; run the same command again")
    if after["ContentLength"] != digest.size:
        raise StageError(f"{url}: the store holds {after['ContentLength']} bytes, {path} has {digest.size}; "
                         "run the same command again")
    if _clean_etag(etag) != digest.etag and _remote_md5(after) != digest.md5:
        raise StageError(f"{url}: checksum mismatch after upload (ETag {etag}, expected {digest.etag}); "
                         "run the same command again")
    return True


def _head(client, url: S3Url) -> dict | None:
    import botocore.exceptions as be

    try:
        return client.head_object(Bucket=url.bucket, Key=url.key)
    except be.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            # A missing bucket also answers 404 to HEAD object: tell them apart.
            _check_bucket(client, url)
            return None
        raise


def _check_bucket(client, url: S3Url) -> None:
    """Raises botocore's NoSuchBucket/AccessDenied (HEAD bucket has no error body to tell them)."""
    client.list_objects_v2(Bucket=url.bucket, MaxKeys=1)


def _deterministic_zip(src_dir: Path, dest: Path) -> None:
    """Zips ``src_dir`` (as its own top folder) with fixed timestamps and order.

    The same folder always gives the same bytes, so a re-run recognises the upload as
    already done. Members are stored (PNG is already compressed).
    """
    files = sorted(p for p in src_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for p in files:
            info = zipfile.ZipInfo(f"{src_dir.name}/{p.relative_to(src_dir).as_posix()}", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            with open(p, "rb") as f, zf.open(info, "w") as out:
                shutil.copyfileobj(f, out, 1 << 20)


@dataclass
class TransferReport:
    """What a staging step moved; ``to_dict`` for JSON."""

    step: str
    url: str
    uploaded: int = 0
    downloaded: int = 0
    skipped: int = 0
    bytes: int = 0
    seconds: float = 0.0
    local: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in ("", {}) or k in ("uploaded", "skipped")}


def upload(src: str | os.PathLike, dest: str | S3Url, config: StageConfig | None = None, *,
           quiet: bool = False, client=None) -> TransferReport:
    """Step 1: uploads the raw release (a zip, or a folder zipped on the fly).

    ``dest`` ending with ``/`` is a prefix: the key is the zip's name (a folder ``X``
    becomes ``X.zip``). Skips the upload when the same bytes are there already; resumes
    an interrupted multipart upload.
    """
    config = config or StageConfig()
    url = dest if isinstance(dest, S3Url) else parse_s3_url(dest)
    src = Path(src).expanduser()
    if not src.exists():
        raise StageError(f"{src}: no such file or folder; give the BUSI zip or its Dataset_BUSI_with_GT folder")
    client = client or make_client(config)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tf-bus-stage-") as tmp:
        if src.is_dir():
            from tf_bus.data.busi import find_release_root

            root = find_release_root(src)
            path = Path(tmp) / f"{root.name}.zip"
            _deterministic_zip(root, path)
        elif zipfile.is_zipfile(src):
            path = src
        else:
            raise StageError(f"{src}: not a zip file or a folder; give the BUSI zip or its Dataset_BUSI_with_GT folder")
        target = url.child(path.name) if url.is_prefix else url
        digest = digest_file(path, config)
        progress = _Progress(digest.size, f"upload {path.name}", quiet)
        try:
            sent = upload_file(client, path, target, config, digest=digest, progress=progress)
        finally:
            progress.close()
    return TransferReport("upload", str(target), uploaded=int(sent), skipped=int(not sent),
                          bytes=digest.size if sent else 0, seconds=round(time.monotonic() - t0, 3),
                          details={"md5": digest.md5, "etag": digest.etag})


# ------------------------------------------------------------------- downloading


def _download_verified(client, url: S3Url, dest: Path, config: StageConfig, *, expect_md5: str | None,
                       expect_size: int | None, progress: _Progress | None) -> str:
    """Downloads ``url`` to ``dest`` through a temp file; returns the MD5; checks it.

    The expected MD5 is ``expect_md5`` (a manifest's), else the object's own (metadata or
    plain ETag), else its multipart ETag is recomputed with the part sizes people use.
    """
    from boto3.s3.transfer import TransferConfig

    if expect_md5 is not None and expect_size is not None and expect_size < config.multipart_threshold_mb * MB:
        return _get_small(client, url, dest, expect_md5, expect_size, progress, config)
    with _s3_errors(url, client):
        head = client.head_object(Bucket=url.bucket, Key=url.key)
        size = head["ContentLength"]
        if expect_size is not None and size != expect_size:
            raise StageError(f"{url}: the store holds {size} bytes, the manifest says {expect_size}: "
                             "the object was replaced after publishing; publish again")
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        try:
            tc = TransferConfig(multipart_threshold=config.multipart_threshold_mb * MB,
                                multipart_chunksize=config.multipart_chunk_mb * MB,
                                max_concurrency=config.max_concurrency)
            client.download_file(url.bucket, url.key, tmp, Config=tc,
                                 ExtraArgs={"ChecksumMode": "ENABLED"} if config.checksum_algorithm else None,
                                 Callback=progress.update if progress else None)
            got = hashlib.md5()
            with open(tmp, "rb") as f:
                while block := f.read(1 << 20):
                    got.update(block)
            md5 = got.hexdigest()
            want = expect_md5 or _remote_md5(head)
            etag = _clean_etag(head.get("ETag"))
            if want is not None:
                ok = md5 == want
            elif "-" in etag:
                n = int(etag.rsplit("-", 1)[1])
                sizes = {s * MB for s in (8, 5, 16, 15, 64, 100)} | {-(-size // n // MB) * MB}
                ok = any(-(-size // s) == n and multipart_etag(tmp, s) == etag for s in sizes if s > 0)
                if not ok and not any(-(-size // s) == n for s in sizes if s > 0):
                    ok = True  # unknown part size: only the length can be checked
            else:
                ok = True  # an encrypted object without our metadata: only the length can be checked
            if not ok or os.path.getsize(tmp) != size:
                raise StageError(
                    f"{url}: checksum mismatch after download (got MD5 {md5}, expected {want or etag}): the "
                    "object is corrupt in the store or was damaged in transit. Nothing was kept; run again, "
                    "and if it repeats, upload the source again"
                )
            os.replace(tmp, dest)
            return md5
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _get_small(client, url: S3Url, dest: Path, expect_md5: str, expect_size: int,
               progress: _Progress | None, config: StageConfig) -> str:
    """One GET for a small object of known size and MD5, hashed as it streams."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        got = hashlib.md5()
        n = 0
        with _s3_errors(url, client), os.fdopen(fd, "wb") as f:
            extra = {"ChecksumMode": "ENABLED"} if config.checksum_algorithm else {}
            body = client.get_object(Bucket=url.bucket, Key=url.key, **extra)["Body"]
            for block in body.iter_chunks(1 << 20):
                got.update(block)
                f.write(block)
                n += len(block)
        if progress:
            progress.update(n)
        if n != expect_size or got.hexdigest() != expect_md5:
            raise StageError(
                f"{url}: checksum mismatch after download (got {n} bytes, MD5 {got.hexdigest()}; the manifest says "
                f"{expect_size} bytes, MD5 {expect_md5}): the object is corrupt in the store or was replaced after "
                "publishing. Nothing was kept; publish again"
            )
        os.replace(tmp, dest)
        return expect_md5
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _list(client, url: S3Url) -> dict[str, dict]:
    out: dict[str, dict] = {}
    prefix = url.key if url.is_prefix else url.key + "/"
    with _s3_errors(url, client):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=url.bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                out[o["Key"]] = o
    return out


def _safe_member_path(name: str, zip_path: Path) -> PurePosixPath | None:
    """The member's relative path, ``None`` to skip it; a ``StageError`` if it is unsafe."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise StageError(f"{zip_path}: member {name!r} has an absolute path; refusing to unzip it")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise StageError(f"{zip_path}: member {name!r} climbs out of the target folder ('..'); refusing to unzip it")
    if not parts or norm.startswith(_SKIP_ZIP_MEMBERS) or parts[-1] == ".DS_Store":
        return None
    return PurePosixPath(*parts)


def safe_unzip(zip_path: str | os.PathLike, dest: str | os.PathLike, config: StageConfig | None = None) -> Path:
    """Unzips ``zip_path`` into ``dest`` (created atomically), refusing unsafe archives.

    Refused, before anything is written: absolute member paths, ``..`` members, symbolic
    links, a total size above ``max_unzip_mb``, a member that expands more than
    ``max_unzip_ratio`` times. While writing, a member that yields more bytes than its
    header declared is refused too (headers can lie).
    """
    config = config or StageConfig()
    zip_path = Path(zip_path)
    limit = config.max_unzip_mb * MB
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as e:
        raise StageError(f"{zip_path}: not a valid zip ({e}); fetch it again") from None
    with zf, atomic_directory(dest, overwrite=True) as tmp:
        members = []
        total = 0
        for info in zf.infolist():
            rel = _safe_member_path(info.filename, zip_path)
            if rel is None:
                continue
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise StageError(f"{zip_path}: member {info.filename!r} is a symbolic link; refusing to unzip it")
            if info.is_dir():
                continue
            total += info.file_size
            if total > limit:
                raise StageError(f"{zip_path}: unpacks to more than {config.max_unzip_mb} MiB (max_unzip_mb); "
                                 "refusing (zip bomb?). Raise --max-unzip-mb if the archive is genuine")
            if info.compress_size and info.file_size / info.compress_size > config.max_unzip_ratio:
                raise StageError(f"{zip_path}: member {info.filename!r} expands {info.file_size / info.compress_size:.0f}x "
                                 f"(limit {config.max_unzip_ratio:g}); refusing (zip bomb?)")
            members.append((info, rel))
        for info, rel in members:
            out = tmp.joinpath(*rel.parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            try:
                with zf.open(info) as src, open(out, "wb") as f:
                    while block := src.read(1 << 20):
                        written += len(block)
                        if written > info.file_size:
                            raise StageError(f"{zip_path}: member {info.filename!r} yields more bytes than its "
                                             "header declares; refusing (zip bomb?)")
                        f.write(block)
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                raise StageError(f"{zip_path}: member {info.filename!r} is corrupt ({e}); fetch the zip again "
                                 "or upload the source again") from None
    return Path(dest)


def fetch(src: str | S3Url, local_dir: str | os.PathLike, config: StageConfig | None = None, *,
          quiet: bool = False, client=None) -> TransferReport:
    """Step 2: downloads the raw zip, verifies it, unzips it safely into ``local_dir``.

    ``src`` is the zip's URL or a prefix holding exactly one zip. Re-running skips the
    download when the local zip has the remote MD5, and the unzip when it was done for
    this zip. ``report.local`` is the release root (``Dataset_BUSI_with_GT``).
    """
    from tf_bus.data.busi import find_release_root

    config = config or StageConfig()
    url = src if isinstance(src, S3Url) else parse_s3_url(src)
    client = client or make_client(config)
    local_dir = Path(local_dir).expanduser()
    t0 = time.monotonic()
    if url.is_prefix:
        zips = [k for k in _list(client, url) if k.lower().endswith(".zip")]
        if len(zips) != 1:
            raise StageError(f"{url}: expected one .zip under this prefix, found {len(zips)} "
                             f"({', '.join(zips[:5]) or 'none'}); give the zip's full URL or upload it first "
                             "(tf-bus stage upload)")
        url = S3Url(url.bucket, zips[0])
    name = PurePosixPath(url.key).name
    zip_local = local_dir / name
    with _s3_errors(url, client):
        head = _head(client, url)
    if head is None:
        raise StageError(f"{url} does not exist: upload it first (tf-bus stage upload ZIP_OR_DIR s3://...)")
    want = _remote_md5(head)
    downloaded = False
    md5 = None
    if zip_local.exists() and zip_local.stat().st_size == head["ContentLength"] and want is not None:
        md5 = digest_file(zip_local, config).md5
    if md5 is None or md5 != want:
        progress = _Progress(head["ContentLength"], f"fetch {name}", quiet)
        try:
            md5 = _download_verified(client, url, zip_local, config, expect_md5=None, expect_size=None,
                                     progress=progress)
        finally:
            progress.close()
        downloaded = True
    extracted = local_dir / Path(name).stem
    marker = extracted / _FETCH_MARKER
    done = json.loads(marker.read_text()) if marker.exists() else {}
    if done.get("md5") != md5:
        safe_unzip(zip_local, extracted, config)
        write_json_atomic(marker, {"source": str(url), "md5": md5, "zip": str(zip_local)})
    root = find_release_root(extracted)
    return TransferReport("fetch", str(url), downloaded=int(downloaded), skipped=int(not downloaded),
                          bytes=head["ContentLength"] if downloaded else 0,
                          seconds=round(time.monotonic() - t0, 3), local=str(root), details={"md5": md5})


# ---------------------------------------------------------------------- publish


def _local_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _key_for(rel: str) -> str:
    return PREPARE_REPORT_KEY if rel == "manifest.json" else rel


def _digest_all(files: list[Path], config: StageConfig) -> list[FileDigest]:
    with cf.ThreadPoolExecutor(min(8, config.max_concurrency)) as pool:
        return list(pool.map(lambda p: digest_file(p, config), files))


def publish(local_out: str | os.PathLike, dest: str | S3Url, config: StageConfig | None = None, *,
            quiet: bool = False, client=None) -> TransferReport:
    """Step 5: uploads a ``tf-bus prepare`` output (both layouts, split, reports).

    Files already there with the same content are skipped; the rest go up in parallel
    and are verified. ``manifest.json`` (every file's key, size and MD5, plus the prepare
    report) is written last, only once everything it lists is in place; an older
    manifest that would describe other content is deleted first, so no reader ever sees
    a manifest for a half-published dataset.
    """
    config = config or StageConfig()
    url = dest if isinstance(dest, S3Url) else parse_s3_url(dest)
    if not url.is_prefix:
        url = S3Url(url.bucket, url.key + "/")
    root = Path(local_out).expanduser()
    if not root.is_dir():
        raise StageError(f"{root}: no such folder; give a `tf-bus prepare` output")
    if not (root / "splits.json").is_file() or not ((root / "classification").is_dir() or (root / "segmentation").is_dir()):
        raise StageError(f"{root}: not a `tf-bus prepare` output (needs splits.json and classification/ or "
                         "segmentation/); run tf-bus prepare (or tf-bus stage prepare) first")
    client = client or make_client(config)
    t0 = time.monotonic()
    files = _local_files(root)
    digests = _digest_all(files, config)
    entries = []
    for p, d in zip(files, digests):
        rel = p.relative_to(root).as_posix()
        entries.append({"path": rel, "key": _key_for(rel), "size": d.size, "md5": d.md5})
    prepare_report = json.loads((root / "manifest.json").read_text()) if (root / "manifest.json").is_file() else None
    manifest = {"format": PUBLISH_FORMAT, "files": entries, "prepare": prepare_report,
                "total_bytes": sum(d.size for d in digests)}
    manifest_url = url.child(MANIFEST)
    remote = _list(client, url)
    old = _read_manifest(client, manifest_url) if url.key + MANIFEST in remote else None
    if old is not None and old.get("files") != entries:
        with _s3_errors(manifest_url, client):
            client.delete_object(Bucket=url.bucket, Key=manifest_url.key)
    todo = []
    for p, d, e in zip(files, digests, entries):
        o = remote.get(url.key + e["key"])
        if o is not None and _same_content(o["Size"], o.get("ETag", ""), None, d):
            continue
        todo.append((p, d, url.child(e["key"])))
    progress = _Progress(sum(d.size for _, d, _ in todo), f"publish {len(todo)} files", quiet)
    try:
        with cf.ThreadPoolExecutor(config.max_concurrency) as pool:
            futures = [pool.submit(_upload_one, client, p, u, config, d, progress) for p, d, u in todo]
            for f in cf.as_completed(futures):
                f.result()
    finally:
        progress.close()
    # Everything the manifest lists is verified in place: now, and only now, the manifest.
    after = _list(client, url)
    for e, d in zip(entries, digests):
        o = after.get(url.key + e["key"])
        if o is None or not _same_content(o["Size"], o.get("ETag", ""), None, d):
            # Multipart objects: the listing's ETag is the multipart one; compare by HEAD.
            head = _head(client, url.child(e["key"])) if o is not None else None
            if head is None or not _same_content(head["ContentLength"], head.get("ETag", ""), _remote_md5(head), d):
                raise StageError(f"{url.child(e['key'])}: missing or different after publishing; run the same "
                                 "command again")
    body = (json.dumps(manifest, indent=2) + "\n").encode()
    if old is None or old != manifest:
        with _s3_errors(manifest_url, client):
            client.put_object(Bucket=url.bucket, Key=manifest_url.key, Body=body,
                              ContentMD5=base64.b64encode(hashlib.md5(body).digest()).decode(),
                              ContentType="application/json", Metadata={MD5_META: hashlib.md5(body).hexdigest()})
    return TransferReport("publish", str(url), uploaded=len(todo), skipped=len(entries) - len(todo),
                          bytes=sum(d.size for _, d, _ in todo), seconds=round(time.monotonic() - t0, 3),
                          local=str(root), details={"files": len(entries), "manifest": str(manifest_url)})


def _upload_one(client, path: Path, url: S3Url, config: StageConfig, digest: FileDigest,
                progress: _Progress) -> None:
    upload_file(client, path, url, config, digest=digest, progress=progress, known_missing=True)


def _read_manifest(client, url: S3Url) -> dict | None:
    import botocore.exceptions as be

    try:
        body = client.get_object(Bucket=url.bucket, Key=url.key)["Body"].read()
    except be.ClientError as e:
        if str(e.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404"):
            return None
        raise explain_s3_error(e, url, client) from None
    except be.BotoCoreError as e:
        raise explain_s3_error(e, url, client) from None
    try:
        manifest = json.loads(body)
    except ValueError:
        raise StageError(f"{url}: not valid JSON; publish again (tf-bus stage publish)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PUBLISH_FORMAT or not isinstance(manifest.get("files"), list):
        raise StageError(f"{url}: not a tf-bus publish manifest (format {PUBLISH_FORMAT}); publish with "
                         "tf-bus stage publish")
    return manifest


# ------------------------------------------------------------- staging for use


def default_cache_dir(config: StageConfig | None = None) -> Path:
    if config is not None and config.cache_dir:
        return Path(config.cache_dir).expanduser()
    return Path(os.environ.get("TF_BUS_CACHE", Path.home() / ".cache" / "tf-bus")).expanduser() / "s3"


def stage_dataset(src: str | S3Url, config: StageConfig | None = None, *, quiet: bool = False,
                  client=None, dest: str | os.PathLike | None = None) -> Path:
    """Makes a published dataset local (for training on ``s3://`` data); returns its folder.

    Reads ``manifest.json`` first (no manifest: the publish is missing or unfinished, and
    nothing is read); downloads each listed file unless the cached copy has its MD5,
    verifies every download, removes cached files the manifest does not list, and marks
    the folder complete last. The folder is the prepare output as it was published.
    """
    config = config or StageConfig()
    url = src if isinstance(src, S3Url) else parse_s3_url(src)
    if not url.is_prefix:
        url = S3Url(url.bucket, url.key + "/")
    client = client or make_client(config)
    manifest_url = url.child(MANIFEST)
    manifest = _read_manifest(client, manifest_url)
    if manifest is None:
        with _s3_errors(url, client):
            _check_bucket(client, url)
        raise StageError(f"{manifest_url} not found: nothing was published there, or a publish did not finish. "
                         "Run tf-bus stage publish (or stage all) to completion first")
    root = Path(dest).expanduser() if dest else default_cache_dir(config) / url.bucket / url.key.rstrip("/")
    root.mkdir(parents=True, exist_ok=True)
    marker = root / _STAGE_MARKER
    if marker.exists():
        with contextlib.suppress(ValueError):
            if json.loads(marker.read_text()) == manifest:
                return root
    with contextlib.suppress(FileNotFoundError):
        marker.unlink()
    entries = manifest["files"]
    for e in entries:
        rel = PurePosixPath(e["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise StageError(f"{manifest_url}: lists an unsafe path {e['path']!r}; refusing to stage it")
    wanted = {e["path"] for e in entries}
    for p in _local_files(root):
        if p.relative_to(root).as_posix() not in wanted:
            p.unlink()

    def need(e: dict) -> bool:
        p = root / e["path"]
        if not p.is_file() or p.stat().st_size != e["size"]:
            return True
        return digest_file(p, config).md5 != e["md5"]

    with cf.ThreadPoolExecutor(min(8, config.max_concurrency)) as pool:
        todo = [e for e, n in zip(entries, pool.map(need, entries)) if n]
    progress = _Progress(sum(e["size"] for e in todo), f"stage {len(todo)} files", quiet)
    try:
        with cf.ThreadPoolExecutor(config.max_concurrency) as pool:
            futures = [pool.submit(_download_verified, client, url.child(e["key"]), root / e["path"], config,
                                   expect_md5=e["md5"], expect_size=e["size"], progress=progress) for e in todo]
            for f in cf.as_completed(futures):
                f.result()
    finally:
        progress.close()
    if manifest.get("prepare") is not None and "manifest.json" not in wanted:
        write_json_atomic(root / "manifest.json", manifest["prepare"])
    write_json_atomic(marker, manifest)
    return root


def local_data(path: str | os.PathLike, config: StageConfig | None = None, *, quiet: bool = False) -> str:
    """``path`` itself, or for an ``s3://`` URL the local folder it was staged to."""
    if is_s3_url(path):
        return str(stage_dataset(str(path), config, quiet=quiet))
    return str(path)


# ------------------------------------------------------------------- all five


def stage_all(raw: str | os.PathLike, base: str | S3Url, work_dir: str | os.PathLike,
              config: StageConfig | None = None, prepare_config: PrepareConfig | None = None, *,
              quiet: bool = False, log: Callable[[str], None] = print) -> list[TransferReport]:
    """The five steps in order: upload to BASE/raw/, fetch into WORK/raw, prepare into
    WORK/prepared (reused if a previous run finished it for the same fetch), publish to
    BASE/ready/. Every step is skipped where its result is already there.
    """
    from tf_bus.data.layouts import prepare

    config = config or StageConfig()
    base_url = base if isinstance(base, S3Url) else parse_s3_url(base)
    if not base_url.is_prefix:
        base_url = S3Url(base_url.bucket, base_url.key + "/")
    work = Path(work_dir).expanduser()
    client = make_client(config)
    reports = []
    r = upload(raw, base_url.child("raw/"), config, quiet=quiet, client=client)
    log(f"[1/5] upload  -> {r.url} ({'uploaded' if r.uploaded else 'already there'})")
    reports.append(r)
    r = fetch(r.url, work / "raw", config, quiet=quiet, client=client)
    log(f"[2/5] fetch   -> {r.local} ({'downloaded' if r.downloaded else 'already there'})")
    reports.append(r)
    prepared = work / "prepared"
    stamp = prepared / _FETCH_MARKER
    fetched_md5 = r.details["md5"]
    if stamp.exists() and json.loads(stamp.read_text()).get("md5") == fetched_md5:
        log(f"[3-4/5] prepare -> {prepared} (already done for this fetch)")
        reports.append(TransferReport("prepare", str(prepared), skipped=1, local=str(prepared)))
    else:
        t0 = time.monotonic()
        rep = prepare(r.local, prepared, prepare_config, overwrite=prepared.exists())
        write_json_atomic(stamp, {"md5": fetched_md5})
        log(f"[3-4/5] prepare -> {prepared} (structure + leak-free split)")
        reports.append(TransferReport("prepare", str(prepared), local=str(prepared),
                                      seconds=round(time.monotonic() - t0, 3),
                                      details={"counts": rep.to_dict().get("counts_after_balancing")}))
    r = publish(prepared, base_url.child("ready/"), config, quiet=quiet, client=client)
    log(f"[5/5] publish -> {r.url} ({r.uploaded} uploaded, {r.skipped} already there)")
    reports.append(r)
    return reports
