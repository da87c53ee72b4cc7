"""Verify-and-store: a helper's batch (renames, then one directory fsync each), and the pool of
helper processes (real processes: killed, signalled, holding the state lock)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import google_crc32c
import pytest

from archiver import store as store_module
from archiver import storeproc
from archiver.config import ArchiveConfig
from archiver.destinations.directory import _is_empty
from archiver.errors import LocalStorageError, StateLocked, TransientError, VerificationError
from archiver.simulator import make_wav, make_zip
from archiver.state import StateDB
from archiver.store import Archived, Store, StoreJob
from archiver.storepool import StorePool
from archiver.storeproc import request_frame

LAYOUT = "{reference_type}/{id}.{ext}"


def _hashes(data: bytes, md5: bytes | None = None) -> dict[str, str]:
    crc = base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()
    digest = md5 if md5 is not None else hashlib.md5(data, usedforsecurity=False).digest()
    return {"crc32c": crc, "md5": base64.b64encode(digest).decode()}


def _job(root: Path, n: int, ref_type: str = "call", bad_md5: bool = False) -> StoreJob:
    rec_id = f"00000000-0000-4000-8000-{n:012d}"
    audio = make_wav(b"\x01\x02" * 800)
    body = make_zip([(f"{rec_id}_in.wav", audio), (f"{rec_id}_out.wav", audio)])
    directory = root.resolve() / ref_type
    directory.mkdir(parents=True, exist_ok=True)
    return StoreJob(
        rec_id, {"id": rec_id, "reference_type": ref_type}, time.time() - 7200, time.time() - 7100, directory,
        directory / f".{rec_id}.download.partial", body, False, len(body),
        _hashes(body, b"\x00" * 16 if bad_md5 else None),
    )


def _cfg(root: Path) -> ArchiveConfig:
    return ArchiveConfig(directory=root, layout=LAYOUT, settle_window=60)


def test_a_batch_fsyncs_each_directory_once_after_every_rename_into_it(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_replace, real_fsync = os.replace, store_module.fsync_path

    def replace(src, dst):
        real_replace(src, dst)
        events.append(("rename", Path(dst).parent.name))

    def fsync_path(path):
        real_fsync(path)
        events.append(("fsync", Path(path).name))

    monkeypatch.setattr(store_module.os, "replace", replace)
    monkeypatch.setattr(store_module, "fsync_path", fsync_path)
    jobs = [_job(tmp_path, i, "call" if i % 2 else "conference") for i in range(6)]
    results = Store(_cfg(tmp_path)).store_batch(jobs)

    assert all(isinstance(r, Archived) for r in results), results
    dir_syncs = [e for e in events if e[0] == "fsync" and e[1] in ("call", "conference")]
    assert sorted(dir_syncs) == [("fsync", "call"), ("fsync", "conference")], "one fsync per directory"
    last_rename = max(i for i, e in enumerate(events) if e[0] == "rename")
    assert all(events.index(s) > last_rename for s in dir_syncs), "each directory fsync follows every rename"
    for job in jobs:
        assert (job.directory / f"{job.rec_id}.zip").read_bytes() == job.tail
        assert (job.directory / f"{job.rec_id}.json").exists()
        assert not job.tmp.exists()


def test_a_bad_body_fails_alone_and_leaves_no_temporary(tmp_path):
    jobs = [_job(tmp_path, 1), _job(tmp_path, 2, bad_md5=True), _job(tmp_path, 3)]
    results = Store(_cfg(tmp_path)).store_batch(jobs)
    assert isinstance(results[0], Archived) and isinstance(results[2], Archived)
    assert isinstance(results[1], VerificationError) and "md5 mismatch" in str(results[1])
    assert sorted(p.name for p in (tmp_path / "call").iterdir()) == sorted(
        f"{jobs[i].rec_id}.{ext}" for i in (0, 2) for ext in ("zip", "json")
    ), "nothing of the bad body is left, not even its temporary"


def test_a_failed_directory_fsync_fails_only_that_directorys_jobs(tmp_path, monkeypatch):
    real_fsync = store_module.fsync_path

    def fsync_path(path):
        if Path(path).name == "conference":
            raise LocalStorageError("cannot fsync conference: Input/output error")
        real_fsync(path)

    monkeypatch.setattr(store_module, "fsync_path", fsync_path)
    jobs = [_job(tmp_path, 1, "call"), _job(tmp_path, 2, "conference")]
    results = Store(_cfg(tmp_path)).store_batch(jobs)
    assert isinstance(results[0], Archived)
    assert isinstance(results[1], LocalStorageError), "not recorded as archived: the rename may not be durable"


@pytest.mark.parametrize("contents", ["missing", "empty", "a file"])
def test_is_empty(tmp_path, contents):
    directory = tmp_path / "d"
    if contents != "missing":
        directory.mkdir()
    if contents == "a file":
        (directory / "x.zip").write_bytes(b"x")
    assert _is_empty(directory) == (contents != "a file")


async def test_a_killed_helper_fails_its_requests_as_transient_and_is_replaced(tmp_path):
    pool = StorePool(_cfg(tmp_path), processes=1)
    try:
        assert isinstance(await pool.store(_job(tmp_path, 1)), Archived)
        stuck = _job(tmp_path, 2)
        os.mkfifo(stuck.tmp)  # the helper blocks opening it for writing: it never answers
        waiting = asyncio.create_task(pool.store(stuck))
        helper = pool._helpers[0]
        await asyncio.sleep(0)  # the request is written before the kill
        os.kill(helper.proc.pid, signal.SIGKILL)
        with pytest.raises(TransientError, match="store helper exited"):
            await asyncio.wait_for(waiting, 30)
        assert isinstance(await pool.store(_job(tmp_path, 3)), Archived), "a new helper took over"
        assert pool._helpers[0] is not helper
    finally:
        await pool.close()


async def test_a_helper_ignores_sigterm_and_exits_when_the_daemon_closes_it(tmp_path):
    pool = StorePool(_cfg(tmp_path), processes=1)
    try:
        await pool.store(_job(tmp_path, 1))
        proc = pool._helpers[0].proc
        os.kill(proc.pid, signal.SIGTERM)  # systemd's stop reaches the whole process group
        assert isinstance(await pool.store(_job(tmp_path, 2)), Archived)
        assert proc.returncode is None
    finally:
        await pool.close()
    assert proc.returncode == 0, "closed stdin: a clean exit, and reaped"


async def test_helpers_hold_the_state_lock_until_they_exit(tmp_path):
    db = tmp_path / "state.sqlite3"
    state = await StateDB.open(db)
    pool = StorePool(_cfg(tmp_path), processes=2, hold_fds=state.lock_fds())
    try:
        await pool.store(_job(tmp_path, 1))
        await state.close()  # the daemon's own descriptor is gone; its helpers' remain
        with pytest.raises(StateLocked, match="in use by another"):
            await StateDB.open(db)
    finally:
        await pool.close()
    second = await StateDB.open(db)
    await second.close()


async def test_a_closed_pool_starts_no_helper(tmp_path):
    pool = StorePool(_cfg(tmp_path), processes=1)
    await pool.store(_job(tmp_path, 1))
    await pool.close()
    with pytest.raises(TransientError, match="shut down"):
        await pool.store(_job(tmp_path, 2))
    assert not pool._helpers


async def test_helpers_warmed_before_the_first_store_are_reaped_by_close(tmp_path):
    """``warm`` starts the helpers in the background (a download has begun); a pool closed
    while they start, or after, leaves no helper running."""
    pool = StorePool(_cfg(tmp_path), processes=2)
    pool.warm()
    pool.warm()  # once only
    deadline = time.monotonic() + 10
    while not pool._starting.locked():  # the helpers are being started
        assert time.monotonic() < deadline
        await asyncio.sleep(0)
    await pool.close()
    assert pool._warming is not None
    await pool._warming
    assert not pool._helpers, "a helper started while closing was left running"
    warmed = StorePool(_cfg(tmp_path), processes=2)
    warmed.warm()
    await warmed._warming
    procs = [h.proc for h in warmed._helpers]
    assert len(procs) == 2
    assert isinstance(await warmed.store(_job(tmp_path, 1)), Archived)
    assert [h.proc for h in warmed._helpers] == procs, "the warmed helpers did the work"
    await warmed.close()
    assert all(p.returncode == 0 for p in procs)


def test_small_bodies_share_a_group_and_a_large_one_is_answered_alone(tmp_path):
    """A group's answers wait for its last store: small bodies share their directory fsync,
    a body as large as a group goes on its own, so its worker is not kept waiting."""
    small = [(n, _job(tmp_path, n)) for n in range(3)]
    large = (9, dataclasses.replace(_job(tmp_path, 9), expected_length=storeproc.GROUP_BYTES))
    groups = storeproc._groups([*small, large, *small])
    assert [[n for n, _ in g] for g in groups] == [[0, 1, 2], [9], [0, 1, 2]]


def test_frames_dribbled_in_small_writes_arrive_whole_and_a_cut_frame_is_the_end(tmp_path):
    """The helper reads each part at its exact length: bodies split over many writes are
    reassembled, and a frame cut off by a dead daemon is end of input, not a bad object."""
    job = _job(tmp_path, 1)
    wire = b"".join(b"".join(request_frame(n, job)) for n in (1, 2))
    cut = request_frame(3, job)[0] + job.tail[:100]
    r, w = os.pipe()

    def dribble() -> None:
        for i in range(0, len(wire + cut), 4093):  # not aligned to any part
            os.write(w, (wire + cut)[i:i + 4093])
        os.close(w)

    writer = threading.Thread(target=dribble)
    writer.start()
    frames = storeproc._Frames(r)
    got = []
    while batch := frames.batch():
        got += [storeproc._request(obj, body) for obj, body in batch]
    writer.join()
    os.close(r)
    assert [n for n, _ in got] == [1, 2], "the cut third frame is dropped"
    assert all(j == job for _, j in got), "each job, body included, as sent"


def test_create_exclusive_replaces_whatever_is_at_the_name_and_never_follows_it(tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    leftovers = {"file": lambda p: p.write_bytes(b"old"), "link": lambda p: p.symlink_to(outside),
                 "dangling": lambda p: p.symlink_to(tmp_path / "nowhere"),
                 "dir": lambda p: (p.mkdir(), (p / "x").write_bytes(b"x"))}
    for name, plant in [("fresh", lambda p: None), *leftovers.items()]:
        path = tmp_path / f".{name}.partial"
        plant(path)
        fd = store_module.create_exclusive(path)
        os.write(fd, b"new")
        os.close(fd)
        assert not path.is_symlink() and path.read_bytes() == b"new", name
    assert outside.read_bytes() == b"keep" and not (tmp_path / "nowhere").exists()


def test_zip_members_are_checked_with_a_true_crc32_and_one_changed_byte_is_refused():
    """zipfile's CRC-32 is zlib-ng's (five times the system zlib's speed): it must be the same
    function, so a stored member whose bytes changed after the ZIP was written is refused."""
    import io
    import zipfile
    import zlib

    from zlib_ng import zlib_ng

    from archiver.inspect import ZipLimits, inspect_zip

    assert zipfile.crc32 is zlib_ng.crc32  # set when archiver.inspect is imported
    data = b"123456789"
    assert zipfile.crc32(data) == zlib.crc32(data) == 0xCBF43926
    assert zipfile.crc32(data[4:], zipfile.crc32(data[:4])) == 0xCBF43926, "carried across chunks"
    wav = make_wav(bytes(range(256)) * 4000)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("c_in.wav", wav)
    body = bytearray(out.getvalue())
    assert [m.crc32 for m in inspect_zip(io.BytesIO(bytes(body)), ZipLimits())] == [zlib.crc32(wav)]
    body[len(body) // 2] ^= 0x01
    with pytest.raises(VerificationError, match="CRC"):
        inspect_zip(io.BytesIO(bytes(body)), ZipLimits())
