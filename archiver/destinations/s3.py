"""S3-compatible object storage (AWS, Ceph RGW, MinIO, ...), with Object Lock for WORM archives.

The store helpers verify a body exactly as for a directory, then stage it (``store.Staged``);
here it is uploaded and only then recorded:

1. HEAD the key. If it already holds our verified copy (an upload whose database commit a
   crash cut off), it is adopted: no second upload, and no second version on a versioned bucket.
2. PUT the body (multipart above ``multipart_threshold``, one part in memory at a time) with
   ``Content-MD5`` on every request (the store checks it) and ``x-amz-checksum-sha256`` (for the
   stores that check that too), the recording id and SHA-256 in its metadata, and the
   retention and legal hold configured.
3. PUT the sidecar ``<id>.json`` beside it, with the same lock.
4. HEAD the body again: size, ETag (the MD5) and our SHA-256 must show. Only then is the
   recording ``archived``.

The no-overwrite rule rests on that HEAD, never on ``If-None-Match: *``, which Ceph RGW ignores
on versioned buckets. Library: aiobotocore (the AWS SDK on aiohttp): per-object retention, legal
hold, ``Content-MD5`` and checksums on every call, including multipart (README, "Archiving to
S3", says what else was measured).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import ipaddress
import json
import random
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

import structlog

from ..config import ArchiveConfig, S3Config
from ..errors import ConfigError, DestinationUnavailable, TransientError
from ..layout import EXTENSIONS, NOTE_SUFFIXES, Layout, beside_rel
from ..logs import register_secret
from ..seal import SUFFIX as SEAL_SUFFIX
from ..seal import recipients_of, sealed
from ..state.base import Row
from ..store import Archived, Staged, StoreJob
from ..verify import sidecar_agrees
from .base import Destination

log = structlog.get_logger("archiver.destinations.s3")

CHECKSUM_REFUSED = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "BadChecksum", "InvalidChecksum"}
UNAVAILABLE = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket", "AllAccessDisabled",
               "AccountProblem", "ExpiredToken", "InvalidToken", "SlowDown", "ServiceUnavailable"}
RETRYABLE = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"}
UPLOAD_TRIES = 3  # a body the store refused for its checksum is sent again this often
RETRY_BASE, RETRY_MAX = 0.25, 5.0  # seconds: our backoff between tries of one request
HEAD_AFTER_WAITS = (0.25, 0.5, 1.0)  # seconds: a HEAD after the upload that does not show it yet is asked again
READ_CHUNK = 1 << 20
VERIFY_CONCURRENCY = 8  # verify --manifest: GETs in flight
T = TypeVar("T")


class S3Destination(Destination):
    """``[archive.s3]``: one bucket, keys ``<prefix><layout>``; the sidecar is ``<id>.json`` beside it."""

    kind = "s3"

    def __init__(self, cfg: ArchiveConfig) -> None:
        assert cfg.s3 is not None
        self.cfg = cfg
        self.s3: S3Config = cfg.s3
        self.layout = Layout(cfg.directory, cfg.layout)  # the root is the staging directory
        self.recipients = recipients_of(cfg.encrypt_to) if cfg.encrypt_to else None
        self._stack = AsyncExitStack()
        self._client: Any = None
        self._empty_at_start: dict[str, asyncio.Future[bool]] = {}
        self._unsettled: set[str] = set()  # keys whose upload began here and has not been recorded
        self._written: dict[str, str] = {}  # of those, the ones the store answered 200 for: key -> sha256
        self._reported: set[Any] = set()  # version ids logged as unlinked_version_found
        for secret in self.s3.secrets():
            register_secret(secret)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            from aiobotocore.config import AioConfig
            from aiobotocore.httpsession import AIOHTTPSession
            from aiobotocore.session import get_session
        except ImportError:
            raise ConfigError(
                '[archive] destination = "s3" needs aiobotocore: pip install "voipbin-archiver[s3]"'
            ) from None
        host = urlsplit(self.s3.endpoint).hostname or ""
        config = AioConfig(
            region_name=self.s3.region,
            signature_version="s3v4",
            # a bucket name is no DNS label on an IP address or localhost
            s3={"addressing_style": "path" if _is_ip_or_localhost(host) else "auto"},
            retries={"total_max_attempts": 1},  # ours, in _call: a PUT must not be resent blindly
            connect_timeout=self.s3.timeout,
            read_timeout=self.s3.timeout,
            max_pool_connections=64,
            # botocore >= 1.36 adds CRC checksums many S3-compatible stores refuse: ours are explicit
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            http_session_cls=_no_blind_resend(AIOHTTPSession),
        )
        self._client = await self._stack.enter_async_context(get_session().create_client(
            "s3", endpoint_url=self.s3.endpoint, aws_access_key_id=self.s3.access_key_id,
            aws_secret_access_key=self.s3.secret_access_key, config=config, verify=True,
        ))
        try:
            await self._check_bucket()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        self._client = None
        await self._stack.aclose()

    async def _check_bucket(self) -> None:
        """Refuse to start (exit 2) on a bucket that is missing, refuses us, or lacks the
        versioning and Object Lock that a configured lock needs."""
        bucket = self.s3.bucket
        try:
            await self._client.head_bucket(Bucket=bucket)
        except Exception as exc:  # noqa: BLE001 - classified below
            status, code = _status_code(exc)
            if status == 404:
                raise ConfigError(f"[archive.s3] bucket {bucket!r} does not exist at {self.s3.endpoint}") from None
            if status in (401, 403):
                raise ConfigError(f"[archive.s3] the store refuses us bucket {bucket!r} ({code or status}): check "
                                  "access_key_id, secret_access_key and the bucket policy") from None
            raise self._unavailable("HEAD bucket", bucket, exc) from None
        if not (self.s3.object_lock_mode or self.s3.legal_hold):
            return
        versioning = await self._call(lambda: self._client.get_bucket_versioning(Bucket=bucket), "versioning of",
                                      bucket)
        if versioning.get("Status") != "Enabled":
            raise ConfigError(f"[archive.s3] bucket {bucket!r} has no versioning enabled; Object Lock "
                              f"(object_lock_mode = {self.s3.object_lock_mode!r}) needs it")
        try:
            lock = await self._client.get_object_lock_configuration(Bucket=bucket)
        except Exception as exc:  # noqa: BLE001 - classified below
            status, code = _status_code(exc)
            if status is not None and status < 500:
                raise ConfigError(
                    f"[archive.s3] bucket {bucket!r} has no Object Lock ({code or status}); it is enabled when a "
                    "bucket is created (x-amz-bucket-object-lock-enabled): create a bucket with it, or set "
                    'object_lock_mode = "" and legal_hold = false'
                ) from None
            raise self._unavailable("Object Lock configuration of", bucket, exc) from None
        if lock.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") != "Enabled":
            raise ConfigError(f"[archive.s3] bucket {bucket!r} does not have Object Lock enabled")

    # ---- the seam ----------------------------------------------------------------------------

    def location(self) -> str:
        return f"s3://{self.s3.bucket}/{self.s3.prefix}"

    def staging_directory(self, row: Row) -> Path:
        return self.layout.root

    def key(self, rel: str) -> str:
        return self.s3.prefix + rel

    async def adopt(self, row: Row, staging: Path) -> Archived | None:
        """What an interrupted run (or a lost database) left in the bucket: a body with its
        sidecar that agree, or a ``no_audio`` sidecar. One LIST per key prefix first, so a
        prefix this process found empty costs no HEAD per recording."""
        ref = row.raw.get("reference_type", "") or ""
        rels = {ext: self.layout.relative(row.id, ext, row.tm_create, ref, row.account) for ext in EXTENSIONS}
        prefix = self.key(rels["zip"]).rpartition("/")[0] + "/"
        if self.recipients:
            rels = {**rels, **{f"{ext}.{SEAL_SUFFIX}": f"{rel}.{SEAL_SUFFIX}" for ext, rel in rels.items()}}
        known = self._empty_at_start.get(prefix)
        if known is None:
            known = self._empty_at_start[prefix] = asyncio.ensure_future(self._prefix_empty(prefix))
        try:
            if await asyncio.shield(known):  # shared: a cancel must not reach it
                return None
        except Exception:
            if self._empty_at_start.get(prefix) is known:  # the bucket was down: ask again next time
                del self._empty_at_start[prefix]
            raise
        meta = await self._sidecar_meta(self.key(_sidecar_rel(rels["zip"])))
        if meta is None:
            return None  # no sidecar: the download's commit adopts a body that is there
        if meta.get("state") == "no_audio" and meta.get("file") is None:
            log.info("existing_object_adopted", recording_id=row.id, key=self.key(_sidecar_rel(rels["zip"])),
                     state="no_audio")
            return Archived(_sidecar_rel(rels["zip"]), int(meta.get("size", 0)), str(meta.get("sha256", "")),
                            meta.get("server_hashes_checked", {}), len(meta.get("members", [])), True,
                            state="no_audio", flag_reason=meta.get("flag_reason") or "")
        for ext, rel in rels.items():
            if meta.get("file") != rel.rpartition("/")[2]:
                continue
            head = await self._head(self.key(rel))
            if head is None or not _holds(head, int(meta.get("size", -1)), str(meta.get("sha256", "")),
                                          _md5_hex(meta.get("md5"))):
                return None  # not (all) ours: download, verify and upload it again
            log.info("existing_object_adopted", recording_id=row.id, key=self.key(rel), kind=ext)
            return Archived(rel, head["ContentLength"], meta["sha256"], meta.get("server_hashes_checked", {}),
                            len(meta.get("members", [])), True, flag=meta.get("flag") or "",
                            flag_reason=meta.get("flag_reason") or "",
                            plain_sha256=str((meta.get("plaintext") or {}).get("sha256") or ""))
        return None

    async def commit(self, job: StoreJob, result: Archived | Staged) -> Archived:
        assert isinstance(result, Staged), "a bucket's helpers only verify and stage"
        archived = result.archived
        lock = self._lock()
        if archived.state == "no_audio":  # the sidecar is all there is
            side_key = self.key(archived.rel_path)
            existing = await self._check_before_write(side_key)
            if existing is None or existing.get("Metadata", {}).get("sha256") != archived.sha256:
                self._unsettled.add(side_key)
                await self._put(side_key, result.sidecar, job.rec_id, archived.sha256, lock, "application/json")
            self._settled(side_key)
            return archived
        body_key = self.key(archived.rel_path)
        side_key = self.key(_sidecar_rel(archived.rel_path))
        md5_hex = _md5_hex(result.md5)
        existing = await self._check_before_write(body_key, archived.size, md5_hex)
        self._unsettled.update((body_key, side_key))
        if existing is not None and _holds(existing, archived.size, archived.sha256, md5_hex):
            # an upload whose commit was cut off: never a second copy (or version) of it
            if self._written.get(side_key) != archived.sha256:  # the store confirmed it: not twice
                side = await self._check_before_write(side_key)
                if side is None or side.get("Metadata", {}).get("sha256") != archived.sha256:
                    await self._put(side_key, result.sidecar, job.rec_id, archived.sha256, lock, "application/json")
            log.info("existing_object_adopted", recording_id=job.rec_id, key=body_key)
            self._settled(body_key, side_key)
            return replace(archived, adopted=True)
        if existing is not None:  # not a verified copy of this recording: it must not stay current
            log.warning("existing_object_replaced", recording_id=job.rec_id, key=body_key,
                        size=existing.get("ContentLength"), etag=existing.get("ETag"),
                        hint="the key held other bytes; on a versioned bucket the old version is kept")
        expected_etag = await self._upload_body(body_key, job, result, lock)
        await self._put(side_key, result.sidecar, job.rec_id, archived.sha256, lock, "application/json")
        for wait in (*HEAD_AFTER_WAITS, None):  # RGW, just restarted, can show a new version late
            head = await self._head(body_key)
            if (head is not None and _holds(head, archived.size, archived.sha256, expected_etag)) or wait is None:
                break
            await asyncio.sleep(wait)
        if head is None or not _holds(head, archived.size, archived.sha256, expected_etag):
            self._written.pop(body_key, None)
            raise TransientError(f"after the upload, {body_key} does not show our size and checksum "
                                 f"(HEAD: {_describe(head)}); uploading again")
        await self._ensure_lock(body_key, head, lock)
        self._settled(body_key, side_key)
        return archived

    def _settled(self, *keys: str) -> None:
        for key in keys:
            self._unsettled.discard(key)
            self._written.pop(key, None)

    def _surely_absent(self, key: str) -> bool:
        """The check before a write, made once per key prefix: a prefix that was empty when this
        process first listed it holds only what this process wrote, and a key whose upload
        began here and was not recorded is HEADed again. Saves one HEAD of four per recording
        (README, Benchmarks). Like the directory's, it assumes one writer per prefix: with a
        shared state (other daemons write this bucket too) every key is HEADed."""
        if self.cfg.temp_tag:
            return False
        known = self._empty_at_start.get(key.rpartition("/")[0] + "/")
        return (known is not None and known.done() and not known.cancelled() and known.exception() is None
                and known.result() and key not in self._unsettled)

    async def _ensure_lock(self, key: str, head: dict[str, Any], lock: dict[str, Any]) -> None:
        """Set the retention and legal hold the HEAD does not show. Ceph RGW 16 ignores the lock
        headers of CreateMultipartUpload, so a multipart body arrives unlocked."""
        version = {"VersionId": head["VersionId"]} if head.get("VersionId") else {}
        if "ObjectLockMode" in lock and head.get("ObjectLockMode") != lock["ObjectLockMode"]:
            await self._call(lambda: self._client.put_object_retention(
                Bucket=self.s3.bucket, Key=key, **version,
                Retention={"Mode": lock["ObjectLockMode"], "RetainUntilDate": lock["ObjectLockRetainUntilDate"]},
            ), "PUT retention of", key)
            log.info("object_lock_applied_after_upload", key=key, mode=lock["ObjectLockMode"])
        if lock.get("ObjectLockLegalHoldStatus") == "ON" and head.get("ObjectLockLegalHoldStatus") != "ON":
            await self._call(lambda: self._client.put_object_legal_hold(
                Bucket=self.s3.bucket, Key=key, **version, LegalHold={"Status": "ON"},
            ), "PUT legal hold of", key)

    async def check(self, row: dict[str, Any], deep: bool = False) -> list[str]:
        """HEAD: size, ETag and our SHA-256 against SQLite and the sidecar; ``deep``: download
        and re-hash the object."""
        rel = row["path"]
        key = self.key(rel)
        if row["state"] == "no_audio":
            meta = await self._sidecar_meta(key)
            if meta is None:
                return [f"{key}: sidecar of a recording without audio missing or unreadable"]
            return [] if sidecar_agrees(meta, row) else [f"{key}: sidecar disagrees with the database"]
        problems: list[str] = []
        side_key = self.key(_sidecar_rel(rel))
        meta = await self._sidecar_meta(side_key)
        if meta is None:
            problems.append(f"{side_key}: sidecar missing or unreadable")
            meta = {}
        elif not sidecar_agrees(meta, row):
            problems.append(f"{side_key}: sidecar disagrees with the database")
        head = await self._head(key)
        if head is None:
            return [*problems, f"{key}: missing"]
        if not _holds(head, row["size"], row["sha256"], _md5_hex(meta.get("md5"))):
            return [*problems, f"{key}: changed ({_describe(head)}; expected size {row['size']}, "
                               f"sha256 {row['sha256'][:16]}...)"]
        if deep:
            hashed = await self._hash_object(key)
            assert hashed is not None  # (not missing_ok: a 404 raises)
            size, sha = hashed
            if size != row["size"] or sha != row["sha256"]:
                problems.append(f"{key}: changed (downloaded: size {size}, sha256 {sha[:16]}..., "
                                f"expected {row['sha256'][:16]}...)")
        return problems

    async def read(self, rel: str, sink: BinaryIO) -> bool:
        key = self.key(rel)

        async def get() -> bool:
            sink.seek(0)
            sink.truncate()
            answer = await self._client.get_object(Bucket=self.s3.bucket, Key=key)
            async with answer["Body"] as stream:
                while chunk := await stream.read(READ_CHUNK):
                    sink.write(chunk)
            return True

        got = await self._call(get, "GET", key, missing_ok=True)
        return bool(got)

    async def write_beside(self, row: dict[str, Any], suffix: str, doc: dict[str, Any]) -> None:
        key = self.key(beside_rel(row["path"], suffix))
        if await self._check_before_write(key) is not None:
            return
        data = json.dumps(sealed(doc, self.recipients), indent=2, sort_keys=True).encode()
        await self._put(key, data, row["id"], row["sha256"] or "", self._lock(), "application/json")

    async def note_call(self, row: dict[str, Any], call: dict[str, Any]) -> None:
        """``<id>.call.json`` beside the sidecar, locked like it: a locked sidecar is never
        rewritten (that would be a second version). Written once: one already there stays."""
        await self.write_beside(row, "call.json", {"recording_id": row["id"], "call": call})

    async def note_server_deleted(self, row: dict[str, Any], request_id: str, status: int) -> None:
        """Nothing in the bucket: a locked object is never rewritten (that would be a second
        version); the deletion audit trail beside the database records it."""

    async def put_file(self, rel: str, data: bytes) -> None:
        """One object, locked like the recordings; one already there with these bytes (a retry
        after a crash) is left as it is."""
        key = self.key(rel)
        sha, md5 = hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()
        head = await self._check_before_write(key, len(data), md5)
        if head is not None and _holds(head, len(data), sha, md5):
            return
        await self._put(key, data, "manifest", sha, self._lock(), "application/json")

    async def list_files(self, under: str = "") -> list[tuple[str, int]]:
        prefix = self.key(under)
        found: list[tuple[str, int]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.s3.bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token

            async def page(kw: dict[str, Any] = kwargs) -> Any:
                return await self._client.list_objects_v2(**kw)

            answer = await self._call(page, "LIST", prefix)
            for item in answer.get("Contents", []):
                found.append((item["Key"][len(self.s3.prefix):], int(item.get("Size", 0))))
            token = answer.get("NextContinuationToken")
            if not answer.get("IsTruncated") or not token:
                return found

    async def hash_files(self, rels: list[str]) -> dict[str, tuple[int, str] | None]:
        return await self._each(rels, lambda rel: self._hash_object(self.key(rel), missing_ok=True))

    async def read_files(self, rels: list[str]) -> dict[str, bytes | None]:
        return await self._each(rels, self.read_bytes)

    async def _each(self, rels: list[str], get: Callable[[str], Awaitable[T]]) -> dict[str, T]:
        """``get`` of each key, ``VERIFY_CONCURRENCY`` requests in flight."""
        gate = asyncio.Semaphore(VERIFY_CONCURRENCY)

        async def one(rel: str) -> T:
            async with gate:
                return await get(rel)

        return dict(zip(rels, await asyncio.gather(*(one(rel) for rel in rels)), strict=True))

    async def unpacked_files(self, rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        return {}  # a bucket keeps the ZIP whole (unpack is for a directory)

    def _keys_of(self, row: dict[str, Any]) -> list[str]:
        """Every key of a recording: its body (or sidecar alone), sidecar and notes."""
        rel = row["path"]
        return sorted({self.key(rel), *(self.key(beside_rel(rel, suffix)) for suffix in NOTE_SUFFIXES)})

    async def _versions_of(self, key: str) -> list[dict[str, Any]]:
        """Every version and delete marker of exactly ``key``."""
        answer = await self._call(lambda: self._client.list_object_versions(
            Bucket=self.s3.bucket, Prefix=key, MaxKeys=1000), "LIST versions of", key)
        return [v for v in [*answer.get("Versions", []), *answer.get("DeleteMarkers", [])] if v.get("Key") == key]

    async def removal_blocked(self, row: dict[str, Any]) -> str:
        now = datetime.now(UTC)
        for key in self._keys_of(row):
            for version in await self._versions_of(key):
                if "Size" not in version:
                    continue  # a delete marker holds no lock
                vid = version.get("VersionId")
                head = await self._call(functools.partial(
                    self._client.head_object, Bucket=self.s3.bucket, Key=key, VersionId=vid), "HEAD", key)
                until = head.get("ObjectLockRetainUntilDate")
                if until is not None and until > now:
                    return f"{key}: Object Lock ({head.get('ObjectLockMode')}) until {until.isoformat()}"
                if head.get("ObjectLockLegalHoldStatus") == "ON":
                    return f"{key}: an S3 legal hold on version {vid}"
        return ""

    async def remove(self, row: dict[str, Any]) -> None:
        for key in self._keys_of(row):
            for version in await self._versions_of(key):
                vid = version.get("VersionId")
                await self._call(functools.partial(
                    self._client.delete_object, Bucket=self.s3.bucket, Key=key, VersionId=vid), "DELETE", key)

    async def set_legal_hold(self, row: dict[str, Any], on: bool) -> None:
        if not on and self.s3.legal_hold:
            return  # [archive.s3] legal_hold = true holds every object: a release leaves it on
        status = "ON" if on else "OFF"
        for key in self._keys_of(row):
            for version in await self._versions_of(key):
                if "Size" not in version:
                    continue
                vid = version.get("VersionId")
                await self._call(functools.partial(
                    self._client.put_object_legal_hold, Bucket=self.s3.bucket, Key=key, VersionId=vid,
                    LegalHold={"Status": status}), "legal hold of", key)

    # ---- requests ----------------------------------------------------------------------------

    def _lock(self) -> dict[str, Any]:
        lock: dict[str, Any] = {}
        if self.s3.object_lock_mode:
            lock["ObjectLockMode"] = self.s3.object_lock_mode
            lock["ObjectLockRetainUntilDate"] = datetime.now(UTC) + timedelta(days=self.s3.retain_days)
        if self.s3.legal_hold:
            lock["ObjectLockLegalHoldStatus"] = "ON"
        return lock

    async def _upload_body(self, key: str, job: StoreJob, staged: Staged, lock: dict[str, Any]) -> str:
        """PUT (or multipart) the body; returns the ETag the store must then show."""
        archived = staged.archived
        if staged.body is not None and archived.size > self.s3.multipart_threshold:
            return await self._multipart(key, staged.body, archived.size, job.rec_id, archived.sha256, lock)
        path = staged.body
        await self._put_object(
            key, (lambda: job.tail) if path is None else (lambda: open(path, "rb")), archived.size,
            _md5_hex(staged.md5), job.rec_id, archived.sha256, lock, staged.md5, _b64_of_hex(archived.sha256),
        )
        return _md5_hex(staged.md5)

    async def _put(self, key: str, data: bytes, rec_id: str, sha256: str, lock: dict[str, Any],
                   content_type: str) -> None:
        """PUT a small object (a sidecar); ``sha256`` is the recording's, for its metadata."""
        md5, sha = _digests(data)
        await self._put_object(key, lambda: data, len(data), md5.hex(), rec_id, sha256, lock,
                               base64.b64encode(md5).decode(), base64.b64encode(sha).decode(), content_type)

    async def _put_object(
        self, key: str, body: Callable[[], Any], size: int, etag: str, rec_id: str, sha256: str,
        lock: dict[str, Any], md5: str, checksum: str, content_type: str = "application/octet-stream",
    ) -> None:
        """A PUT is not idempotent on a versioned bucket: an answer lost after the store wrote it
        (a timeout, a reset) must not become a second version. So before sending it again, a HEAD
        asks whether our copy is there already. A refused checksum is sent again (``UPLOAD_TRIES``)."""

        async def send() -> None:
            data = body()
            try:
                await self._client.put_object(
                    Bucket=self.s3.bucket, Key=key, Body=data, ContentMD5=md5, ChecksumSHA256=checksum,
                    ContentType=content_type, Metadata={"recording-id": rec_id, "sha256": sha256}, **lock,
                )
            finally:
                if hasattr(data, "close"):
                    data.close()

        async def landed() -> bool:
            head = await self._head_after_doubt(key, size, etag)
            return head is not None and _holds(head, size, sha256, etag)

        for attempt in range(1, UPLOAD_TRIES + 1):
            try:
                await self._call(send, "PUT", key, landed=landed)
                self._written[key] = sha256
                return
            except _ChecksumRefused as exc:
                if attempt == UPLOAD_TRIES:
                    raise TransientError(f"the bucket refused PUT {key}: {exc} ({attempt} times)") from None
                log.warning("upload_checksum_refused", key=key, attempt=attempt, error=str(exc))

    async def _multipart(
        self, key: str, path: Path, size: int, rec_id: str, sha256: str, lock: dict[str, Any]
    ) -> str:
        """One part in memory at a time, each with its own Content-MD5 and SHA-256. Parts are
        idempotent (a part number sent again replaces itself); the upload completes once."""
        created = await self._call(lambda: self._client.create_multipart_upload(
            Bucket=self.s3.bucket, Key=key, ContentType="application/octet-stream", ChecksumAlgorithm="SHA256",
            Metadata={"recording-id": rec_id, "sha256": sha256}, **lock,
        ), "create multipart upload of", key)
        upload_id = created["UploadId"]
        parts: list[dict[str, Any]] = []
        md5s: list[bytes] = []
        try:
            with open(path, "rb") as f:
                while part := await asyncio.to_thread(f.read, self.s3.part_size):
                    md5, sha = await asyncio.to_thread(_digests, part)
                    number = len(parts) + 1
                    for attempt in range(1, UPLOAD_TRIES + 1):
                        try:
                            answer = await self._call(functools.partial(
                                self._client.upload_part, Bucket=self.s3.bucket, Key=key, UploadId=upload_id,
                                PartNumber=number, Body=part, ContentMD5=base64.b64encode(md5).decode(),
                                ChecksumSHA256=base64.b64encode(sha).decode(),
                            ), "PUT part of", key)
                            break
                        except _ChecksumRefused as exc:
                            if attempt == UPLOAD_TRIES:
                                raise TransientError(f"the bucket refused a part of {key}: {exc}") from None
                    parts.append({"PartNumber": number, "ETag": answer["ETag"],
                                  "ChecksumSHA256": base64.b64encode(sha).decode()})
                    md5s.append(md5)
                    del part
            etag = f"{hashlib.md5(b''.join(md5s), usedforsecurity=False).hexdigest()}-{len(parts)}"

            async def landed() -> bool:
                head = await self._head_after_doubt(key, size, etag)
                return head is not None and _holds(head, size, sha256, etag)

            await self._call(lambda: self._client.complete_multipart_upload(
                Bucket=self.s3.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts},
            ), "complete multipart upload of", key, landed=landed)
        except BaseException:
            try:  # best effort: a lifecycle rule for incomplete uploads catches what this misses
                await asyncio.shield(self._client.abort_multipart_upload(
                    Bucket=self.s3.bucket, Key=key, UploadId=upload_id))
            except Exception:  # noqa: BLE001
                log.warning("multipart_abort_failed", key=key)
            raise
        return etag

    async def _prefix_empty(self, prefix: str) -> bool:
        answer = await self._call(
            lambda: self._client.list_objects_v2(Bucket=self.s3.bucket, Prefix=prefix, MaxKeys=1), "LIST", prefix)
        return not answer.get("KeyCount") and not answer.get("Contents")

    async def _head(self, key: str) -> dict[str, Any] | None:
        head: dict[str, Any] | None = await self._call(
            lambda: self._client.head_object(Bucket=self.s3.bucket, Key=key), "HEAD", key, missing_ok=True)
        return head

    async def _check_before_write(self, key: str, size: int | None = None, etag: str = "") -> dict[str, Any] | None:
        """What ``key`` holds before we write it: nothing where it is surely absent, else its HEAD,
        after a listing when an earlier attempt of ours began writing it."""
        if self._surely_absent(key):
            return None
        return await (self._head_after_doubt(key, size, etag) if key in self._unsettled else self._head(key))

    async def _head_after_doubt(self, key: str, size: int | None = None, etag: str = "") -> dict[str, Any] | None:
        """HEAD of a key an earlier request of ours may have written, after a listing of its
        versions. A gateway that dies between writing an object and committing it to the bucket
        index leaves the version pending: a HEAD does not show it, a listing resolves it (Ceph
        RGW's "dir suggest"). Without that LIST, six gateway kills made a second version in one
        run of four. One that dies after the commit and before the version is made current leaves
        a version no HEAD or GET sees: the key must be written again, and the version left
        behind (same bytes) is logged as ``unlinked_version_found``."""
        listed = await self._call(lambda: self._list_versions(key), "LIST versions of", key)
        head = await self._head(key)
        current = None if head is None else (head.get("VersionId"), _etag(head))
        for version in listed:
            theirs = (version.get("VersionId"), _etag(version))
            if theirs != current and theirs[0] not in self._reported and (
                    size is None or (version.get("Size") == size and theirs[1] == etag)):
                self._reported.add(theirs[0])  # once, not on every resend that lists it again
                log.warning("unlinked_version_found", key=key, version_id=theirs[0], size=version.get("Size"),
                            etag=theirs[1], current=_describe(head),
                            hint="not the key's current version: left by a request cut off earlier "
                                 "(a gateway that died), or an older copy; the key is written again")
        return head

    async def _list_versions(self, key: str) -> list[dict[str, Any]]:
        """The versions of exactly ``key`` (a plain LIST, which resolves pending entries too,
        where ``s3:ListBucketVersions`` is not granted)."""
        try:
            answer = await self._client.list_object_versions(Bucket=self.s3.bucket, Prefix=key, MaxKeys=100)
        except Exception as exc:  # classified by _call, unless it is the permission
            if _status_code(exc)[0] != 403:
                raise
            await self._client.list_objects_v2(Bucket=self.s3.bucket, Prefix=key, MaxKeys=100)
            return []
        return [v for v in answer.get("Versions", []) if v.get("Key") == key]

    async def _get_json(self, key: str) -> Any:
        """A small JSON object (a sidecar), or None when it is missing or not JSON."""

        async def get() -> bytes:
            answer = await self._client.get_object(Bucket=self.s3.bucket, Key=key)
            async with answer["Body"] as stream:
                return await stream.read(1 << 20)  # type: ignore[no-any-return]

        data = await self._call(get, "GET", key, missing_ok=True)
        try:
            return None if data is None else json.loads(data)
        except ValueError:
            return None

    async def _sidecar_meta(self, key: str) -> dict[str, Any] | None:
        """The ``archive`` part of the sidecar at ``key``, or None when missing or not one."""
        side = await self._get_json(key)
        meta = side.get("archive") if isinstance(side, dict) else None
        return meta if isinstance(meta, dict) else None

    async def _hash_object(self, key: str, missing_ok: bool = False) -> tuple[int, str] | None:
        async def get() -> tuple[int, str]:
            answer = await self._client.get_object(Bucket=self.s3.bucket, Key=key)
            sha = hashlib.sha256()
            size = 0
            async with answer["Body"] as stream:
                while chunk := await stream.read(READ_CHUNK):
                    size += len(chunk)
                    sha.update(chunk)
            return size, sha.hexdigest()

        got: tuple[int, str] | None = await self._call(get, "GET", key, missing_ok=missing_ok)
        return got

    async def _call(
        self, send: Callable[[], Awaitable[Any]], what: str, key: str, missing_ok: bool = False,
        landed: Callable[[], Awaitable[bool]] | None = None,
    ) -> Any:
        """``send()`` with our retries (botocore's are off: they would resend a PUT whose answer
        was lost): ``retries`` tries with backoff on a lost answer, a 5xx or ``SlowDown``; with
        ``landed``, asked before each resend whether the store has it already. ``missing_ok``: a
        404 is None. Then the failure as one of our outcomes."""
        for attempt in range(1, self.s3.retries + 1):
            try:
                return await send()
            except Exception as exc:  # noqa: BLE001 - classified below
                status, code = _status_code(exc)
                if missing_ok and status == 404:
                    return None
                if code in CHECKSUM_REFUSED:
                    raise _ChecksumRefused(code) from None
                if not _worth_retrying(status, code) or attempt == self.s3.retries:
                    raise self._classify(what, key, exc) from None
                log.info("bucket_retry", request=what, key=key, attempt=attempt, error=code or status or
                         type(exc).__name__)
            await asyncio.sleep(min(RETRY_MAX, RETRY_BASE * 2**attempt) * random.uniform(0.5, 1.0))
            if landed is not None and await landed():
                return None
        raise AssertionError("unreachable")

    def _classify(self, what: str, key: str, exc: Exception) -> Exception:
        """The store's refusal of a request as one of our outcomes (after our retries)."""
        status, code = _status_code(exc)
        if status is None or status >= 500 or code in UNAVAILABLE:
            return self._unavailable(what, key, exc)
        return TransientError(f"the bucket refused {what} {key}: {code or status}")

    def _unavailable(self, what: str, key: str, exc: Exception) -> DestinationUnavailable:
        status, code = _status_code(exc)
        detail = f"{code or status}" if status is not None else type(exc).__name__
        return DestinationUnavailable(f"cannot write to the bucket {self.s3.bucket!r} at {self.s3.endpoint} "
                                      f"({what} {key}: {detail}, after {self.s3.retries} tries)")


def _no_blind_resend(base: type) -> type:
    """aiohttp sends an "idempotent" request (PUT included) once more by itself when a kept-alive
    connection breaks before the answer; on a versioned bucket that is a second version of a key
    whose first PUT the store had already written (a test with a proxy that swallows answers
    caught it). Our ``_call`` resends only after a HEAD, so aiohttp must not."""

    class NoBlindResend(base):  # type: ignore[misc]
        async def _get_session(self, proxy_url: Any) -> Any:
            session = await super()._get_session(proxy_url)
            session._retry_connection = False  # aiohttp >= 3.10 has no public switch for it
            return session

    return NoBlindResend


class _ChecksumRefused(Exception):
    """The store refused a request's Content-MD5 or checksum: the bytes changed on the way."""


def _worth_retrying(status: int | None, code: str) -> bool:
    return status is None or status >= 500 or status == 429 or code in RETRYABLE


def _status_code(exc: BaseException) -> tuple[int | None, str]:
    """(HTTP status, S3 error code) of a botocore ClientError; (None, "") for anything else."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, ""
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = str(response.get("Error", {}).get("Code", ""))
    return (int(status) if status else None), code


def _holds(head: dict[str, Any], size: int, sha256: str, etag: str) -> bool:
    """Whether a HEAD shows our copy: its size and SHA-256 (our metadata), and its ETag: the
    body's MD5 for a single PUT, ``md5(part MD5s)-<parts>`` right after a multipart upload."""
    if head.get("ContentLength") != size or head.get("Metadata", {}).get("sha256") != sha256:
        return False
    theirs = _etag(head)
    if "-" in theirs and "-" not in etag:
        return True  # a multipart ETag is no MD5 of the whole body: size and SHA-256 only (--deep re-hashes)
    return not etag or theirs == etag


def _etag(answer: dict[str, Any]) -> str:
    """The ETag of a HEAD or a listed version, without its quotes."""
    return str(answer.get("ETag", "")).strip('"')


def _describe(head: dict[str, Any] | None) -> str:
    if head is None:
        return "missing"
    return (f"size {head.get('ContentLength')}, ETag {head.get('ETag')}, "
            f"sha256 {str(head.get('Metadata', {}).get('sha256', '-'))[:16]}")


def _sidecar_rel(rel: str) -> str:
    return beside_rel(rel, "json")



def _md5_hex(b64: Any) -> str:
    try:
        return base64.b64decode(str(b64), validate=True).hex() if b64 else ""
    except ValueError:
        return ""


def _b64_of_hex(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _digests(data: bytes) -> tuple[bytes, bytes]:
    return hashlib.md5(data, usedforsecurity=False).digest(), hashlib.sha256(data).digest()


def _is_ip_or_localhost(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True
