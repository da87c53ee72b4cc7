"""The power-cut filesystem itself: it loses exactly what an unsynced disk loses, no less."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.powercut import PowerCutMount, require_fuse

pytestmark = pytest.mark.powercut


@pytest.fixture
def boot(tmp_path: Path) -> Iterator[PowerCutMount]:
    require_fuse()
    mount = PowerCutMount(tmp_path / "disk", tmp_path / "mnt").mount()
    try:
        yield mount
    finally:
        mount.unmount()


def write(path: Path, data: bytes, sync: bool) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_unsynced_data_and_names_are_lost_synced_ones_kept(boot: PowerCutMount) -> None:
    m, disk = boot.mountpoint, boot.backing
    write(m / "durable", b"a" * 10_000, sync=True)
    write(m / "named-only", b"b" * 5_000, sync=False)
    fsync_dir(m)  # both names durable now; only one file's data
    write(m / "durable", b"c" * 3, sync=False)  # an unsynced overwrite
    write(m / "never-named", b"d", sync=True)  # data synced, its directory never
    os.mkdir(m / "sub")
    write(m / "sub" / "inner", b"e", sync=True)
    fsync_dir(m / "sub")  # the entry in sub is durable, but sub's own entry in / is not
    assert (m / "never-named").read_bytes() == b"d"  # programs see it all before the cut
    boot.command("cut")
    with pytest.raises(OSError):
        os.listdir(m)  # the machine is off
    boot.unmount()
    assert (disk / "durable").read_bytes() == b"a" * 10_000
    assert (disk / "named-only").read_bytes() == b""  # ext4 with delayed allocation: a zero-length file
    assert not (disk / "never-named").exists()
    assert not (disk / "sub").exists()


def test_a_rename_without_a_directory_fsync_can_go_either_way(tmp_path: Path) -> None:
    require_fuse()
    outcomes = set()
    for seed in range(12):
        mount = PowerCutMount(tmp_path / f"disk{seed}", tmp_path / f"mnt{seed}").mount()
        try:
            write(mount.mountpoint / "old", b"payload", sync=True)
            fsync_dir(mount.mountpoint)
            os.rename(mount.mountpoint / "old", mount.mountpoint / "new")
            mount.command(f"cut random {seed}")
        finally:
            mount.unmount()
        names = tuple(sorted(os.listdir(mount.backing)))
        assert names in {("old",), ("new",)}, names  # never torn: exactly one name, never both or none
        assert (mount.backing / names[0]).read_bytes() == b"payload"
        outcomes.add(names)
    assert outcomes == {("old",), ("new",)}


def test_a_clean_unmount_keeps_everything(tmp_path: Path) -> None:
    require_fuse()
    mount = PowerCutMount(tmp_path / "disk", tmp_path / "mnt").mount()
    os.makedirs(mount.mountpoint / "a" / "b")
    write(mount.mountpoint / "a" / "b" / "f", b"x" * 70_000, sync=False)
    mount.unmount()
    assert (mount.backing / "a" / "b" / "f").read_bytes() == b"x" * 70_000
    again = PowerCutMount(mount.backing, mount.mountpoint).mount()  # and a reboot serves it
    try:
        assert (again.mountpoint / "a" / "b" / "f").read_bytes() == b"x" * 70_000
    finally:
        again.unmount()


def test_sqlite_in_wal_mode_keeps_what_it_committed(boot: PowerCutMount) -> None:
    db = sqlite3.connect(boot.mountpoint / "state.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (x INTEGER)")
    for i in range(200):
        db.execute("INSERT INTO t VALUES (?)", (i,))
    db.execute("BEGIN")
    db.execute("INSERT INTO t VALUES (-1)")  # never committed
    boot.command("cut")
    db.close()  # the process dies with the machine (its close cannot write any more)
    boot.unmount()
    survived = sqlite3.connect(boot.backing / "state.sqlite3")
    assert survived.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert survived.execute("SELECT count(*), min(x) FROM t").fetchone() == (200, 0)


def test_an_armed_trigger_cuts_right_after_that_operation(boot: PowerCutMount) -> None:
    m = boot.mountpoint
    boot.command("arm rename /*.final 2")
    for name in ("one", "two", "three"):
        write(m / f"{name}.tmp", name.encode(), sync=True)
    fsync_dir(m)
    os.rename(m / "one.tmp", m / "one.final")
    fsync_dir(m)
    os.rename(m / "two.tmp", m / "two.final")  # the power goes right after this
    with pytest.raises(OSError):
        os.rename(m / "three.tmp", m / "three.final")
    assert boot.was_cut and boot.cut_summary()["why"] == "after rename /two.final"
    boot.unmount()
    assert sorted(os.listdir(boot.backing)) == ["one.final", "three.tmp", "two.tmp"]


def test_a_bad_command_is_refused(boot: PowerCutMount) -> None:
    with pytest.raises(OSError):
        boot.command("explode")
    assert not boot.was_cut
