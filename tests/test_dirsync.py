"""DirectorySync: one directory fsync serves many renames, and never one that started too early."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from archiver import download
from archiver.download import DirectorySync
from archiver.errors import LocalStorageError


def _recording_fsync(monkeypatch, fail_first: bool = False) -> list[tuple[str, float, float]]:
    """Wrap the real fsync_path: record (directory, start, end); slow enough that calls overlap."""
    real = download.fsync_path
    syncs: list[tuple[str, float, float]] = []
    lock = threading.Lock()
    failed = []

    def fsync_path(path):
        start = time.monotonic()
        time.sleep(0.005)
        if fail_first and not failed:
            failed.append(path)
            raise LocalStorageError("cannot fsync: injected")
        real(path)
        with lock:
            syncs.append((path.name, start, time.monotonic()))

    monkeypatch.setattr(download, "fsync_path", fsync_path)
    return syncs


def test_each_caller_waits_for_an_fsync_that_started_after_it_asked(tmp_path, monkeypatch):
    syncs = _recording_fsync(monkeypatch)
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    sync = DirectorySync()
    calls: list[tuple[str, float, float]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        directory = dirs[i % 2]
        asked = time.monotonic()
        sync.sync(directory)
        with lock:
            calls.append((directory.name, asked, time.monotonic()))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(200)))
    assert len(calls) == 200
    for name, asked, returned in calls:
        assert any(d == name and start >= asked and end <= returned for d, start, end in syncs), (name, asked)
    assert len(syncs) < len(calls), "concurrent callers share an fsync"


def test_a_failed_fsync_raises_for_its_caller_and_the_others_try_again(tmp_path, monkeypatch):
    syncs = _recording_fsync(monkeypatch, fail_first=True)
    sync = DirectorySync()
    results: list[str] = []

    def one(_: int) -> None:
        try:
            sync.sync(tmp_path)
            results.append("ok")
        except LocalStorageError:
            results.append("error")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(4)))
    assert results.count("error") == 1 and results.count("ok") == 3
    assert syncs, "a waiter ran the fsync itself after the failure"


@pytest.mark.parametrize("contents", ["missing", "empty", "a file"])
def test_is_empty(tmp_path, contents):
    directory = tmp_path / "d"
    if contents != "missing":
        directory.mkdir()
    if contents == "a file":
        (directory / "x.zip").write_bytes(b"x")
    assert download._is_empty(directory) == (contents != "a file")
