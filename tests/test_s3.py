"""The S3 destination against a real Ceph RADOS Gateway (``tests/rgw.py``): Object Lock, one
version per key, adoption after a crash, an outage, a corrupted upload, ``verify``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.checks import assert_same_audio
from tests.conftest import cli_command, cli_env, db_rows, run_cli, wait_until, write_config
from tests.rgw import RGW

pytestmark = pytest.mark.s3

botocore_session = pytest.importorskip("botocore.session")
from botocore.config import Config as BotoConfig  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402


class Bucket:
    """A fresh bucket and a plain (sync) botocore client to look at it from outside."""

    def __init__(self, rgw: RGW, lock: bool, versioning: bool = True) -> None:
        self.rgw = rgw
        self.name = f"t-{uuid.uuid4().hex[:16]}"
        self.client = botocore_session.get_session().create_client(
            "s3", endpoint_url=rgw.endpoint, region_name="us-east-1", aws_access_key_id=rgw.access_key,
            aws_secret_access_key=rgw.secret_key, config=BotoConfig(s3={"addressing_style": "path"}),
        )
        self.client.create_bucket(Bucket=self.name, **({"ObjectLockEnabledForBucket": True} if lock else {}))
        if versioning and not lock:
            self.client.put_bucket_versioning(Bucket=self.name, VersioningConfiguration={"Status": "Enabled"})

    def section(self, **extra: Any) -> dict[str, Any]:
        return {"endpoint": self.rgw.endpoint, "bucket": self.name, "prefix": "voipbin/",
                "access_key_id": self.rgw.access_key, "secret_access_key": self.rgw.secret_key,
                "retries": 2, "timeout": 10, **extra}

    def versions(self) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {}
        for page in self.client.get_paginator("list_object_versions").paginate(Bucket=self.name):
            for v in page.get("Versions", []):
                found.setdefault(v["Key"], []).append(v)
        return found

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()


def s3_config(tmp_path: Path, sim: Any, bucket: Bucket, workers: dict[str, Any] | None = None, **s3: Any) -> Path:
    return write_config(tmp_path, sim, workers=workers or {}, **{"archive": {"directory": None, "destination": "s3"},
                                                                 "archive.s3": bucket.section(**s3)})


def assert_bucket_complete(sim: Any, bucket: Bucket, db: Path, log: Path | None = None) -> None:
    """Every expected recording archived once: its object byte-identical, one version per key,
    its sidecar beside it naming the same SHA-256; nothing else in the bucket. With ``log``: a
    version that a killed gateway left unlinked may stay beside the current one, when the daemon
    logged it (``unlinked_version_found``) and, for a body, it holds the same bytes."""
    expected = sim.expected_archives()
    rows = {r[0]: r for r in db_rows(db) if r[1] == "archived"}
    assert set(rows) == set(expected), f"missing {sorted(set(expected) - set(rows))[:3]}"
    versions = bucket.versions()
    if log is not None:
        events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        logged = {(e["key"], e["version_id"]) for e in events if e["event"] == "unlinked_version_found"}
        for key, listed in versions.items():
            latest = next(v for v in listed if v["IsLatest"])
            versions[key] = [v for v in listed if v is latest or (key, v["VersionId"]) not in logged
                             or (key.endswith(".zip") and (v["Size"], v["ETag"]) != (latest["Size"], latest["ETag"]))]
    doubled = {k: [(x["Size"], x["ETag"], x["IsLatest"], str(x["LastModified"])) for x in v]
               for k, v in versions.items() if len(v) > 1}
    assert not doubled, f"keys with more than one version: {list(doubled.items())[:3]}"
    known = set()
    for rec_id, body in expected.items():
        rel, sha = rows[rec_id][2], rows[rec_id][3]
        key = "voipbin/" + rel
        side_key = key.rpartition(".")[0] + ".json"
        meta = json.loads(bucket.get(side_key))["archive"]
        if meta.get("fetched_from") == "storage_files":  # our own ZIP of the listed files
            body = bucket.get(key)
            assert_same_audio(sim, rec_id, body)
        else:
            assert bucket.get(key) == body, f"{rec_id}: bytes differ"
        assert sha == hashlib.sha256(body).hexdigest()
        assert meta["sha256"] == sha and meta["size"] == len(body)
        known |= {key, side_key}
    assert set(versions) == known, f"objects the database does not know: {sorted(set(versions) - known)[:3]}"


@pytest.mark.parametrize("listing", [False, True], ids=["recordingfiles", "storage-listing"])
async def test_backfill_to_a_compliance_bucket(tmp_path, make_sim, rgw, listing):
    bucket = Bucket(rgw, lock=True)
    sim = await make_sim(recordings=30, audio_bytes=20_000, deleted=2, pending=2, end_after=0.5)
    cfg = s3_config(tmp_path, sim, bucket, object_lock_mode="COMPLIANCE", retain_days=2, legal_hold=False)
    if listing:
        cfg.write_text(cfg.read_text().replace("storage_listing = false", "storage_listing = true"))
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "30")
    assert result.rc == 0, result
    db = tmp_path / "state.sqlite3"
    assert_bucket_complete(sim, bucket, db)
    assert not (tmp_path / "archive").exists(), "a bucket archive writes no archive directory"
    staging = tmp_path / "s3-staging"
    assert not [p for p in staging.rglob("*") if p.is_file()], "staged bodies left behind"
    rel = db_rows(db, "SELECT path FROM recordings WHERE state = 'archived' LIMIT 1")[0][0]
    key = "voipbin/" + rel
    head = bucket.client.head_object(Bucket=bucket.name, Key=key)
    assert head["ObjectLockMode"] == "COMPLIANCE"
    until = head["ObjectLockRetainUntilDate"]
    assert datetime.now(UTC) + timedelta(days=1.9) < until < datetime.now(UTC) + timedelta(days=2.1)
    assert head["Metadata"]["sha256"] == db_rows(db, f"SELECT sha256 FROM recordings WHERE path = '{rel}'")[0][0]
    side = bucket.client.head_object(Bucket=bucket.name, Key=key.rpartition(".")[0] + ".json")
    assert side["ObjectLockMode"] == "COMPLIANCE", "the sidecar carries the same lock"
    version = bucket.versions()[key][0]["VersionId"]
    with pytest.raises(ClientError) as refused:
        bucket.client.delete_object(Bucket=bucket.name, Key=key, VersionId=version)
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    assert bucket.get(key), "still there"

    for deep in ((), ("--deep",)):
        verified = await run_cli("--config", str(cfg), "verify", *deep)
        assert verified.rc == 0, verified
        assert "28 archived recordings: 0 problem(s)" in verified.out

    again = await run_cli("--config", str(cfg), "backfill", "--wait", "5")  # nothing new: nothing written
    assert again.rc == 0, again
    assert_bucket_complete(sim, bucket, db)
    if listing:
        assert sim.stats["recordingfiles"] <= 2, sim.stats  # the two pending ones may need a ZIP


async def test_a_lost_database_is_rebuilt_from_the_bucket_without_uploading_again(tmp_path, make_sim, rgw):
    bucket = Bucket(rgw, lock=True)
    sim = await make_sim(recordings=40, audio_bytes=10_000)
    cfg = s3_config(tmp_path, sim, bucket, object_lock_mode="GOVERNANCE", retain_days=1)
    assert (first := await run_cli("--config", str(cfg), "backfill", "--wait", "10")).rc == 0, first
    for name in ("state.sqlite3", "state.sqlite3-wal", "state.sqlite3-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    gets = sum(sim.storage_gets.values())
    second = await run_cli("--config", str(cfg), "backfill", "--wait", "10")
    assert second.rc == 0, second
    assert sum(sim.storage_gets.values()) == gets, "adopted from the bucket, not downloaded again"
    assert second.err.count('"existing_object_adopted"') == 40
    assert_bucket_complete(sim, bucket, tmp_path / "state.sqlite3")


async def test_an_upload_whose_commit_was_lost_is_adopted_not_uploaded_again(tmp_path, make_sim, rgw):
    """Body uploaded, then the crash: no sidecar, no SQLite commit. The rerun downloads and
    verifies it again, finds our copy under the key (HEAD: size, ETag, SHA-256) and writes only
    the sidecar: still one version of the body."""
    bucket = Bucket(rgw, lock=False)
    sim = await make_sim(recordings=20, audio_bytes=10_000)
    cfg = s3_config(tmp_path, sim, bucket)
    assert (first := await run_cli("--config", str(cfg), "backfill", "--wait", "10")).rc == 0, first
    db = tmp_path / "state.sqlite3"
    lost = db_rows(db, "SELECT id, path FROM recordings WHERE state = 'archived' LIMIT 5")
    for _, rel in lost:  # the sidecar never made it, nor the commit
        side_key = "voipbin/" + rel.rpartition(".")[0] + ".json"
        for v in bucket.versions()[side_key]:
            bucket.client.delete_object(Bucket=bucket.name, Key=side_key, VersionId=v["VersionId"])
    con = sqlite3.connect(db)
    with con:
        con.executemany("UPDATE recordings SET state = 'pending', path = NULL, sha256 = NULL, next_attempt_at = 0 "
                        "WHERE id = ?", [(rec_id,) for rec_id, _ in lost])
    con.close()
    second = await run_cli("--config", str(cfg), "backfill", "--wait", "10")
    assert second.rc == 0, second
    assert second.err.count('"existing_object_adopted"') == 5, second.err[-3000:]
    assert_bucket_complete(sim, bucket, db)


async def test_sigkill_mid_backfill_then_resume(tmp_path, make_sim, rgw):
    bucket = Bucket(rgw, lock=True)
    sim = await make_sim(recordings=150, latency=0.01, audio_bytes=20_000)
    cfg = s3_config(tmp_path, sim, bucket, object_lock_mode="COMPLIANCE", retain_days=1)
    db = tmp_path / "state.sqlite3"
    for threshold in (15, 60, 105):
        proc = await asyncio.create_subprocess_exec(
            *cli_command("--config", str(cfg), "backfill", "--wait", "60"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=cli_env(),
            start_new_session=True,
        )
        try:
            await wait_until(lambda t=threshold: _archived(db) >= t, 90, f"{threshold} archived")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    final = await run_cli("--config", str(cfg), "backfill", "--wait", "60")
    assert final.rc == 0, final
    assert_bucket_complete(sim, bucket, db)


async def test_the_gateway_going_away_pauses_the_service_and_loses_nothing(tmp_path, make_sim, rgw):
    bucket = Bucket(rgw, lock=False)
    sim = await make_sim(recordings=150, latency=0.02, audio_bytes=20_000)
    cfg = s3_config(tmp_path, sim, bucket, workers={"trouble_pause": 1})
    db = tmp_path / "state.sqlite3"
    log = tmp_path / "run.log"
    with open(log, "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *cli_command("--config", str(cfg), "run"), stdout=asyncio.subprocess.DEVNULL, stderr=err, env=cli_env(),
        )
        try:
            await wait_until(lambda: _archived(db) >= 20, 60, "20 archived")
            await asyncio.to_thread(rgw.stop_gateway)
            try:
                await wait_until(lambda: b'"archive_unwritable"' in log.read_bytes(), 60, "the pause")
            finally:
                await asyncio.to_thread(rgw.start_gateway)
            for threshold in (70, 100):  # then killed twice more, each time back at once: a PUT cut off
                await wait_until(lambda t=threshold: _archived(db) >= t, 90, f"{threshold} archived")
                await asyncio.to_thread(rgw.stop_gateway)
                await asyncio.to_thread(rgw.start_gateway)
            await wait_until(lambda: _archived(db) == 150, 120, "everything archived after the outages")
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == 0
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert "writable_again" in names
    assert "failed" not in names and not db_rows(db, "SELECT id FROM recordings WHERE state = 'failed'")
    pause = next(e for e in events if e["event"] == "archive_unwritable")
    assert "cannot write to the bucket" in pause["reason"] and rgw.secret_key not in log.read_text()
    assert_bucket_complete(sim, bucket, db, log)


class CorruptingProxy:
    """A TCP proxy in front of RGW that flips one byte in the body of the first ``n`` PUTs of
    a recording body (not a sidecar): what a bad NIC or a broken middlebox does. With
    ``drop_answer``, it corrupts nothing but swallows those PUTs' answers and resets the
    connection: the store has the object, the client does not know."""

    def __init__(self, upstream_port: int, n: int, drop_answer: bool = False) -> None:
        self.upstream_port = upstream_port
        self.left = n
        self.drop_answer = drop_answer
        self.corrupted: list[str] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        back = asyncio.create_task(self._pipe(up_reader, writer))
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                sizes = [int(h.split(":", 1)[1]) for h in lines[1:] if h.lower().startswith("content-length:")]
                length = sizes[0] if sizes else 0
                corrupt = method == "PUT" and length > 0 and not path.split("?")[0].endswith(".json") and self.left > 0
                if corrupt:
                    self.left -= 1
                    self.corrupted.append(path)
                up_writer.write(head)  # at once: the client may wait for "100 Continue" before its body
                await up_writer.drain()
                sent = 0
                while sent < length:
                    chunk = bytearray(await reader.read(min(65536, length - sent)))
                    if not chunk:
                        raise asyncio.IncompleteReadError(b"", length - sent)
                    if corrupt and self.drop_answer and sent + len(chunk) == length:
                        back.cancel()  # before the last byte: the answer cannot have come yet
                    elif corrupt and sent <= length // 2 < sent + len(chunk):
                        chunk[length // 2 - sent] ^= 0x01
                    up_writer.write(bytes(chunk))
                    await up_writer.drain()
                    sent += len(chunk)
                if corrupt and self.drop_answer:
                    await asyncio.wait_for(up_reader.readuntil(b"\r\n\r\n"), 30)  # stored; the answer goes nowhere
                    writer.transport.abort()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            up_writer.close()
            back.cancel()
            writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass


async def _backfill_through(proxy: CorruptingProxy, tmp_path: Path, make_sim: Any, bucket: Bucket,
                            policy: dict[str, Any] | None = None) -> Any:
    """A backfill of 10 recordings to ``bucket`` with ``proxy`` between us and the gateway (and
    ``policy`` as the bucket's policy meanwhile)."""
    port = await proxy.start()
    if policy is not None:
        bucket.client.put_bucket_policy(Bucket=bucket.name, Policy=json.dumps(policy))
    try:
        sim = await make_sim(recordings=10, audio_bytes=10_000)
        cfg = s3_config(tmp_path, sim, bucket, endpoint=f"http://127.0.0.1:{port}",
                        object_lock_mode="COMPLIANCE", retain_days=1)
        result = await run_cli("--config", str(cfg), "backfill", "--wait", "10")
    finally:
        await proxy.close()
        if policy is not None:
            bucket.client.delete_bucket_policy(Bucket=bucket.name)
    assert result.rc == 0, result
    assert len(proxy.corrupted) == 3
    assert_bucket_complete(sim, bucket, tmp_path / "state.sqlite3")  # one version per key
    return result


async def test_a_corrupted_upload_is_refused_by_the_store_and_sent_again(tmp_path, make_sim, rgw):
    result = await _backfill_through(CorruptingProxy(rgw.port, n=3), tmp_path, make_sim, Bucket(rgw, lock=True))
    assert result.err.count('"upload_checksum_refused"') == 3, result.err[-3000:]


async def test_a_put_whose_answer_was_lost_is_not_sent_again(tmp_path, make_sim, rgw):
    """The store wrote the object, the answer never came: a blind resend would be a second
    version of a locked key. The HEAD before the resend finds our copy instead."""
    proxy = CorruptingProxy(rgw.port, n=3, drop_answer=True)
    result = await _backfill_through(proxy, tmp_path, make_sim, Bucket(rgw, lock=True))
    assert result.err.count('"bucket_retry"') >= 3, result.err[-3000:]


async def test_a_lost_answer_without_the_versions_listing_permission(tmp_path, make_sim, rgw):
    """Where ``s3:ListBucketVersions`` is not granted, the check before a resend falls back to
    a plain LIST: no pause, no second version."""
    bucket = Bucket(rgw, lock=True)
    deny = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action":
            "s3:ListBucketVersions", "Resource": f"arn:aws:s3:::{bucket.name}"}]}
    result = await _backfill_through(CorruptingProxy(rgw.port, n=3, drop_answer=True), tmp_path, make_sim, bucket,
                                     policy=deny)
    assert result.err.count('"bucket_retry"') >= 3 and '"archive_unwritable"' not in result.err, result.err[-3000:]


async def test_a_lock_mode_on_a_bucket_without_object_lock_refuses_to_start(tmp_path, make_sim, rgw):
    sim = await make_sim(recordings=3)
    plain = Bucket(rgw, lock=False)
    cfg = s3_config(tmp_path, sim, plain, object_lock_mode="COMPLIANCE", retain_days=30)
    result = await run_cli("--config", str(cfg), "backfill")
    assert result.rc == 2, result
    assert "has no Object Lock" in result.err and plain.name in result.err
    unversioned = Bucket(rgw, lock=False, versioning=False)
    cfg = s3_config(tmp_path, sim, unversioned, object_lock_mode="GOVERNANCE", retain_days=30)
    result = await run_cli("--config", str(cfg), "backfill")
    assert result.rc == 2 and "no versioning enabled" in result.err, result
    cfg = write_config(tmp_path, sim, **{"archive": {"directory": None, "destination": "s3"},
                                         "archive.s3": plain.section(bucket="no-such-bucket-here")})
    result = await run_cli("--config", str(cfg), "backfill")
    assert result.rc == 2 and "does not exist" in result.err, result
    assert not sim.stats["recordingfiles"], "nothing was downloaded"
    assert rgw.secret_key not in result.err + result.out


async def test_verify_catches_an_object_replaced_out_of_band(tmp_path, make_sim, rgw):
    bucket = Bucket(rgw, lock=True)
    sim = await make_sim(recordings=12, audio_bytes=10_000)
    cfg = s3_config(tmp_path, sim, bucket, object_lock_mode="GOVERNANCE", retain_days=1)
    assert (first := await run_cli("--config", str(cfg), "backfill", "--wait", "10")).rc == 0, first
    rows = db_rows(tmp_path / "state.sqlite3", "SELECT path, sha256 FROM recordings WHERE state = 'archived'")
    (crude, _), (subtle, sha) = rows[0], rows[1]
    bucket.client.put_object(Bucket=bucket.name, Key="voipbin/" + crude, Body=b"not the recording")
    # the same size and our own metadata: only the bytes (the ETag) tell
    forged = bytearray(bucket.get("voipbin/" + subtle))
    forged[-1] ^= 0xFF
    bucket.client.put_object(Bucket=bucket.name, Key="voipbin/" + subtle, Body=bytes(forged),
                             Metadata={"recording-id": "x", "sha256": sha})
    for deep in ((), ("--deep",)):
        result = await run_cli("--config", str(cfg), "verify", *deep)
        assert result.rc == 1, result
        assert "2 problem(s)" in result.out, result.out
        assert crude in result.out and subtle in result.out

    repaired = await run_cli("--config", str(cfg), "verify", "--repair")
    assert repaired.rc == 0, repaired
    assert "verified again: 12 archived recordings, 0 problem(s)" in repaired.out
    assert bucket.get("voipbin/" + subtle) == sim.expected_archives()[_id(subtle)]
    assert len(bucket.versions()["voipbin/" + subtle]) == 3, "the replaced versions stay (locked), ours is current"


async def test_a_large_body_goes_multipart(tmp_path, make_sim, rgw):
    bucket = Bucket(rgw, lock=True)
    sim = await make_sim(recordings=3, audio_bytes=7_500_000)  # about 7.5 MB per ZIP: two 5 MiB parts
    cfg = s3_config(tmp_path, sim, bucket, object_lock_mode="COMPLIANCE", retain_days=1,
                    multipart_threshold=5 * 1024**2, part_size=5 * 1024**2)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "10")
    assert result.rc == 0, result
    assert_bucket_complete(sim, bucket, tmp_path / "state.sqlite3")
    for key in bucket.versions():
        if key.endswith(".zip"):
            head = bucket.client.head_object(Bucket=bucket.name, Key=key)
            assert head["ETag"].strip('"').endswith("-2"), head["ETag"]
            assert head["ObjectLockMode"] == "COMPLIANCE"
    verified = await run_cli("--config", str(cfg), "verify", "--deep")
    assert verified.rc == 0, verified


def _archived(db: Path) -> int:
    try:
        return len(db_rows(db, "SELECT id FROM recordings WHERE state = 'archived'"))
    except sqlite3.Error:
        return 0


def _id(rel: str) -> str:
    return rel.rpartition("/")[2].partition(".")[0]


async def test_deleting_the_server_copy_re_verifies_the_object_first(tmp_path, make_sim, rgw):
    bucket = Bucket(rgw, lock=True)
    sim = await make_sim(recordings=5, audio_bytes=5000)
    cfg = write_config(tmp_path, sim, retention={"delete_from_server": True, "delete_after": 0},
                       **{"archive": {"directory": None, "destination": "s3"},
                          "archive.s3": bucket.section(object_lock_mode="GOVERNANCE", retain_days=1)})
    first = await run_cli("--config", str(cfg), "backfill", "--wait", "10", "--no-delete")
    assert first.rc == 0, first
    victim, rel = db_rows(tmp_path / "state.sqlite3", "SELECT id, path FROM recordings WHERE state = 'archived'")[0]
    forged = bytearray(bucket.get("voipbin/" + rel))
    forged[len(forged) // 2] ^= 0xFF  # same size, same metadata: only the ETag tells
    head = bucket.client.head_object(Bucket=bucket.name, Key="voipbin/" + rel)
    bucket.client.put_object(Bucket=bucket.name, Key="voipbin/" + rel, Body=bytes(forged), Metadata=head["Metadata"])
    result = await run_cli("--config", str(cfg), "prune")
    assert result.rc == 1, result
    assert "server_delete_refused" in result.err
    assert victim not in sim.deletes and len(sim.deletes) == 4
    audit = [json.loads(line) for line in (tmp_path / "deletions.jsonl").read_text().splitlines()]
    assert sorted(a["recording_id"] for a in audit) == sorted(sim.deletes)
    assert all(a["archive"] == f"s3://{bucket.name}/voipbin/" for a in audit)
    again = await run_cli("--config", str(cfg), "backfill", "--wait", "5")  # repaired, then deleted
    assert again.rc == 0, again
    assert bucket.get("voipbin/" + rel) == sim.expected_archives()[victim]
    assert set(sim.deletes) == set(sim.recordings) and set(sim.deletes.values()) == {1}


async def test_the_signed_manifest_in_a_compliance_bucket(tmp_path, make_sim, rgw):
    """Segments are locked objects under the prefix; what an intruder with the bucket's keys can
    still do (a new version over a locked key, a delete marker, a new object) is caught and named."""
    from archiver.manifest import keygen

    bucket = Bucket(rgw, lock=True)
    sim = await make_sim(recordings=10, audio_bytes=10_000)
    keygen(tmp_path / "k")
    cfg = write_config(tmp_path, sim, archive={"directory": None, "destination": "s3",
                                               "signing_key_file": str(tmp_path / "k")},
                       **{"archive.s3": bucket.section(object_lock_mode="COMPLIANCE", retain_days=1)})
    assert (run := await run_cli("--config", str(cfg), "backfill", "--wait", "10")).rc == 0, run
    segments = [k for k in bucket.versions() if k.startswith("voipbin/manifests/default/")]
    assert len(segments) == 1
    assert bucket.client.head_object(Bucket=bucket.name, Key=segments[0])["ObjectLockMode"] == "COMPLIANCE"
    ok = await run_cli("--config", str(cfg), "verify", "--manifest")
    assert ok.rc == 0 and "10 recording(s), 10 file(s) re-hashed" in ok.out, ok
    # two of the first run's (listed in segment 1, which stays)
    rows = db_rows(tmp_path / "state.sqlite3", "SELECT path FROM recordings WHERE state = 'archived' ORDER BY path")

    sim.add_recording()
    assert (run := await run_cli("--config", str(cfg), "backfill", "--wait", "10")).rc == 0, run
    replaced, hidden = "voipbin/" + rows[0][0], "voipbin/" + rows[1][0]
    bucket.client.put_object(Bucket=bucket.name, Key=replaced, Body=b"PK\x05\x06" + b"\0" * 18)  # a new version
    bucket.client.delete_object(Bucket=bucket.name, Key=hidden)  # a delete marker over the locked version
    bucket.client.put_object(Bucket=bucket.name, Key="voipbin/2020/01/01/planted.zip", Body=b"x")
    first, newest = sorted(k for k in bucket.versions() if k.startswith("voipbin/manifests/default/"))
    bucket.client.delete_object(Bucket=bucket.name, Key=newest)
    edited = bucket.get(first).replace(b'"archived"', b'"Archived"', 1)
    bucket.client.put_object(Bucket=bucket.name, Key=first, Body=edited)  # a new version over the locked one
    bad = await run_cli("--config", str(cfg), "verify", "--manifest")
    assert bad.rc == 1, bad
    assert f"{first[8:]}: its signature does not match its content (edited)" in bad.out
    assert f"{replaced[8:]}: changed" in bad.out and f"{hidden[8:]}: missing" in bad.out
    assert "2020/01/01/planted.zip: in the archive but in no manifest entry" in bad.out
    assert f"segment 2 ({newest[8:]}) was written" in bad.out


async def test_expire_and_hold_in_a_bucket(tmp_path, make_sim, rgw):
    """Expiry removes every version once no lock holds it; a hold is the S3 legal hold on each
    version, and a locked object is kept; keep_days under the lock is refused at start."""
    bucket = Bucket(rgw, lock=True)
    sim = await make_sim(recordings=6, audio_bytes=5000)
    cfg = s3_config(tmp_path, sim, bucket)
    cfg.write_text(cfg.read_text().replace("[archive]\n", "[archive]\nkeep_days = 30\n"))
    cli = ("--config", str(cfg))
    assert (run := await run_cli(*cli, "backfill", "--wait", "10")).rc == 0, run
    db = tmp_path / "state.sqlite3"
    rows = {r[0]: r[2] for r in db_rows(db) if r[1] == "archived"}
    old = sorted(rows)[:3]
    with sqlite3.connect(db) as con:
        con.executemany("UPDATE recordings SET tm_start = ? WHERE id = ?", [(time_ago(40), i) for i in old])
    held = old[0]
    bucket.client.put_object(Bucket=bucket.name, Key="voipbin/" + rows[old[1]], Body=b"a second version")
    assert (r := await run_cli(*cli, "hold", "add", held, "--reason", "case 4711")).rc == 0, r
    key = "voipbin/" + rows[held]
    assert bucket.client.get_object_legal_hold(Bucket=bucket.name, Key=key)["LegalHold"]["Status"] == "ON"
    done = await run_cli(*cli, "expire")
    assert done.rc == 0 and "2 removed" in done.out and "1 kept under a hold" in done.out, done
    versions = bucket.versions()
    for rec_id in old[1:]:
        stem = "voipbin/" + rows[rec_id].rpartition(".")[0]
        assert not [k for k in versions if k.startswith(stem)], f"{rec_id}: a version left"
    assert key in versions
    assert (r := await run_cli(*cli, "hold", "remove", held, "--reason", "closed")).rc == 0, r
    assert bucket.client.get_object_legal_hold(Bucket=bucket.name, Key=key)["LegalHold"]["Status"] == "OFF"
    assert (await run_cli(*cli, "erase", held, "--reason", "request 17")).rc == 0
    assert key not in bucket.versions()

    # a bucket whose lock outlasts keep_days: refused at start; one whose lock still runs: kept
    locked = Bucket(rgw, lock=True)
    short = s3_config(tmp_path, sim, locked, object_lock_mode="GOVERNANCE", retain_days=2)
    short.write_text(short.read_text().replace("[archive]\n", "[archive]\nkeep_days = 1\n"))
    refused = await run_cli("--config", str(short), "expire")
    assert refused.rc == 2 and "shorter than the bucket's lock" in refused.err, refused
    (tmp_path / "state.sqlite3").unlink()
    lock_cfg = s3_config(tmp_path, sim, locked, object_lock_mode="GOVERNANCE", retain_days=2)
    lock_cfg.write_text(lock_cfg.read_text().replace("[archive]\n", "[archive]\nkeep_days = 2\n"))
    assert (run := await run_cli("--config", str(lock_cfg), "backfill", "--wait", "10")).rc == 0, run
    with sqlite3.connect(db) as con:
        con.execute("UPDATE recordings SET tm_start = ?", (time_ago(40),))
    kept = await run_cli("--config", str(lock_cfg), "expire")
    locked_count = len(sim.expected_archives())
    assert kept.rc == 0 and "0 removed" in kept.out and f"{locked_count} kept by the bucket's lock" in kept.out, kept
    assert len([k for k in locked.versions() if k.endswith(".zip")]) == len(sim.expected_archives())


def time_ago(days: float) -> float:
    return datetime.now(UTC).timestamp() - days * 86400
