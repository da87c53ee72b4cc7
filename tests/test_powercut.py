"""Power loss, not just kill -9: the whole pipeline on the power-cut filesystem.

After SIGKILL the page cache survives, so a missing fsync goes unnoticed. Here the state
database and the archive live on ``tests/powercutfs.py``: at each cut it keeps only what was
fsynced (or a random part of the rest), the archiver dies with the machine, and the next "boot"
starts from what survived. After every cut the survivors are checked against the simulator's
bytes; at the end the archive must be complete, with nothing lost, duplicated or left over.

By hand, more cuts and other moments: ``POWERCUT_SCALE=4 POWERCUT_SEED=7 pytest -m powercut``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyrage
import pytest

from archiver.manifest import keygen
from archiver.simdata import make_wav, make_zip
from archiver.simulator import Simulator
from tests.checks import assert_archive_complete, assert_same_audio
from tests.conftest import REPO, cli_command, cli_env, run_cli, wait_until, write_config
from tests.powercut import PowerCutMount, require_fuse

pytestmark = pytest.mark.powercut
# More by hand: POWERCUT_SCALE=4 multiplies the cuts (33 in CI), POWERCUT_SEED picks other moments.
SCALE = int(os.environ.get("POWERCUT_SCALE", "1"))
SEED = int(os.environ.get("POWERCUT_SEED", "0"))


@dataclass
class CutLog:
    """What a sequence of boots did: every cut, why, and what the checks found."""

    cuts: list[str] = field(default_factory=list)
    finished_early: int = 0  # boots whose run ended before their trigger fired
    archived_at_cut: list[int] = field(default_factory=list)


def schedule(rng: random.Random, n: int, kind: str, deleting: bool = False, manifest: bool = False) -> list[str]:
    """``n`` cut commands: chosen moments (right after a body's rename into its final name, a
    sidecar's, a directory fsync that ends a store batch, a SQLite commit, in the middle of a
    body's write; when deleting, right after the audit trail's fsync), random ones (after the
    N-th operation of any kind) and random points in time (``after SECONDS``); a third of them
    keep a random part of what was volatile instead of none of it."""
    chosen = [
        lambda: f"after {rng.uniform(1.0, 2.5):.2f}",
        lambda: f"arm rename /archive/*.{kind} {rng.randint(1, 12)}",
        lambda: f"arm rename /archive/*.json {rng.randint(1, 12)}",
        lambda: f"arm fsyncdir /archive/* {rng.randint(1, 10)}",
        lambda: f"arm fsync /state.sqlite3-wal {rng.randint(1, 40)}",
        lambda: f"arm write /archive/*.partial {rng.randint(1, 30)}",
        lambda: f"arm any * {rng.randint(30, 600)}",
        lambda: f"arm any * {rng.randint(30, 600)}",
    ]
    if deleting:
        chosen.append(lambda: f"arm fsync /deletions.jsonl {rng.randint(1, 2)}")
    if manifest:  # right after a segment's rename, before the state records it
        chosen.append(lambda: f"arm rename /archive/manifests/* {rng.randint(1, 3)}")
    commands = []
    for i in range(n):
        command = chosen[i % len(chosen)]()
        if rng.random() < 1 / 3:
            command += f" random {rng.randrange(1 << 30)}"
        commands.append(command)
    rng.shuffle(commands)
    return commands


async def boot_and_run(
    cfg: Path, mount: PowerCutMount, arm: str | None, log: Path, env: dict[str, str] | None = None,
    cut_when_done: bool = False,
) -> int | None:
    """Mount, start a backfill, and either let it finish (its exit code) or cut the power at the
    armed moment: the filesystem freezes, then every process of the archiver dies (None).
    ``cut_when_done``: once it has finished, cut the power before the unmount's sync."""
    mount.mount()
    delay = None
    if arm and arm.startswith("after "):  # a point in time: "after SECONDS [random SEED]"
        delay, _, rest = arm.removeprefix("after ").partition(" ")
        delay, arm = float(delay), f"cut {rest}".strip()
    elif arm:
        mount.command(arm)
    with open(log, "ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *cli_command("--config", str(cfg), "backfill", "--wait", "30"),
            stdout=out, stderr=out, env=env or cli_env(), start_new_session=True,
            cwd=cfg.parent,  # not the repository: ``-m`` puts the working directory first on the path
        )
    waiter = asyncio.ensure_future(proc.wait())
    try:
        if delay is not None and arm:
            await asyncio.wait([waiter], timeout=delay)
            if not waiter.done():
                mount.command(arm)
        await wait_until(lambda: waiter.done() or mount.was_cut, 240, "the run to end or the power to go")
    finally:
        if not waiter.done():
            with contextlib.suppress(ProcessLookupError):  # it may have just ended by itself
                os.killpg(proc.pid, signal.SIGKILL)  # the daemon and its store helpers, at once
        await waiter
        try:
            await wait_until(lambda: not _group_alive(proc.pid), 20, "the archiver's processes to die")
            finished = not mount.was_cut
            if cut_when_done and finished:
                mount.command("cut")
        finally:
            mount.unmount()
    return proc.returncode if finished else None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def survived_rows(disk: Path) -> list[tuple[str, str, str | None, str | None]]:
    """The database as the next boot will find it (read from a copy: nothing is changed)."""
    if not (disk / "state.sqlite3").exists():
        return []
    copy = disk.parent / "db-copy"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir()
    for name in ("state.sqlite3", "state.sqlite3-wal"):
        if (disk / name).exists():
            shutil.copy(disk / name, copy / name)
    db = sqlite3.connect(copy / "state.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",), "the database did not survive intact"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "recordings" not in tables:
            return []
        return db.execute("SELECT id, state, path, sha256 FROM recordings").fetchall()
    finally:
        db.close()


def check_survivors(sim: Simulator, disk: Path, identities: list[Any] | None = None) -> int:
    """What a machine finds after the power came back: every file under a final name complete
    and right; every recording the database calls archived present with its sidecar; no
    recording deleted from the server without a surviving copy. Returns how many are archived.
    ``identities``: an encrypted archive, whose bodies are decrypted to be compared, and where no
    plaintext audio is under a final name."""
    bodies = {rid: body for rid, body in sim.expected_archives().items()}
    archive = disk / "archive"
    finals: dict[str, Path] = {}
    for path in archive.rglob("*") if archive.exists() else []:
        if not path.is_file() or path.name.startswith(".") or path.name == "deletions.jsonl":
            continue
        if path.relative_to(archive).parts[0] == "manifests":
            json.loads(path.read_bytes())  # a segment under its final name is whole
            continue
        rec_id = path.name.split(".")[0]
        assert rec_id in bodies, f"{path}: a final name for a recording with no body"
        if path.name.endswith(".call.json"):
            continue  # a late call, sealed (encrypted archives)
        if path.suffix == ".json":
            meta = json.loads(path.read_text())["archive"]  # a torn sidecar fails here
            if identities:
                assert "plaintext" in meta or meta.get("state") == "no_audio", f"{path}: a sidecar of no ciphertext"
            elif meta.get("fetched_from") == "storage_files":  # our own ZIP of the listed files
                assert meta["storage_files"], f"{path}: a listing sidecar that names no file"
            else:
                assert meta["sha256"] == hashlib.sha256(bodies[rec_id]).hexdigest(), f"{path}: wrong sidecar"
        else:
            data = path.read_bytes()
            if identities:
                assert path.suffix == ".age", f"{path}: plaintext audio under a final name"
                data = pyrage.decrypt(data, identities)  # a torn ciphertext fails here
            if data != bodies[rec_id]:  # not the server's body: our own ZIP of its listed files, complete
                assert_same_audio(sim, rec_id, data)  # a torn or wrong ZIP fails here
                side = sidecar_of(path)  # a cut can keep the body's rename and lose the sidecar's
                if side.exists() and not identities:
                    meta = json.loads(side.read_text())["archive"]
                    assert meta["fetched_from"] == "storage_files", f"{path}: wrong bytes under a final name"
                    assert hashlib.sha256(data).hexdigest() == meta["sha256"], f"{path}: wrong sidecar"
            finals[rec_id] = path
    archived = {r[0]: r for r in survived_rows(disk) if r[1] == "archived"}
    for rec_id, (_, _, rel, sha) in archived.items():
        body = archive / rel
        assert body.is_file(), f"{rec_id}: archived in SQLite, but its file did not survive"
        assert hashlib.sha256(body.read_bytes()).hexdigest() == sha, f"{rec_id}: archived with other bytes"
        assert sidecar_of(body).is_file(), f"{rec_id}: archived in SQLite, but its sidecar did not survive"
    lost = [rid for rid in sim.deletes if rid not in finals or not sidecar_of(finals[rid]).is_file()]
    assert not lost, f"deleted from the server, but no archive copy survived: {lost[:5]}"
    return len(archived)


def sidecar_of(body: Path) -> Path:
    return (body.with_suffix("") if body.suffix == ".age" else body).with_suffix(".json")


def assert_no_plaintext_left(disk: Path) -> None:
    """After the last run: no plaintext audio anywhere in the archive, temporaries included."""
    for path in (disk / "archive").rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                assert f.read(4) not in (b"PK\x03\x04", b"RIFF"), f"{path}: plaintext audio left at rest"


async def cut_power_repeatedly(
    sim: Simulator, tmp_path: Path, cuts: int, seed: int, manifest: bool = False, encrypted: bool = False,
    **sections: dict[str, Any]
) -> CutLog:
    """``manifest``: signed every half second, so cuts fall in segment writes too; after the last
    run, ``verify --manifest`` must find the archive whole, with the state and without it.
    ``encrypted``: to an age key; every check decrypts, and no plaintext audio may survive."""
    disk, mnt = tmp_path / "disk", tmp_path / "mnt"
    signing: dict[str, Any] = {"signing_key_file": str(tmp_path / "signing.key"), "manifest_interval": 0.5} \
        if manifest else {}
    if manifest:
        keygen(tmp_path / "signing.key")
    identity = pyrage.x25519.Identity.generate() if encrypted else None
    identities = [identity] if identity else None
    if identity is not None:
        signing["encrypt_to"] = [str(identity.to_public())]
    cfg = write_config(
        tmp_path, sim, archive={"directory": str(mnt / "archive"), "settle_window": 60, **signing},
        state={"database": str(mnt / "state.sqlite3")}, **sections,
    )
    mount = PowerCutMount(disk, mnt)
    rng = random.Random(seed)
    result = CutLog()
    log = tmp_path / "runs.log"
    deleting = bool(sections.get("retention", {}).get("delete_from_server"))
    commands = schedule(rng, cuts, f"{sim.cfg.mode}.age" if encrypted else sim.cfg.mode, deleting, manifest)
    while commands:
        command = commands[0]
        rc = await boot_and_run(cfg, mount, command, log)
        if rc is not None:  # the work ran out before this moment came: new calls were recorded
            assert rc == 0, log.read_text()[-3000:]
            if command.startswith("after "):  # a point in time: come sooner
                seconds, _, rest = command.removeprefix("after ").partition(" ")
                commands[0] = f"after {float(seconds) / 2:.2f} {rest}".strip()
            result.finished_early += 1
            assert result.finished_early <= cuts, "the runs keep ending before their moment"
            check_survivors(sim, disk, identities)
            for _ in range(40):
                sim.add_recording(reference_type=rng.choice(["call", "confbridge"]))
            continue
        commands.pop(0)
        result.cuts.append(f"{command} -> {mount.cut_summary()['why']}")
        result.archived_at_cut.append(check_survivors(sim, disk, identities))
    rc = await boot_and_run(cfg, mount, None, log)  # the power stays on: run to the end
    assert rc == 0, log.read_text()[-3000:]
    check_survivors(sim, disk, identities)
    if encrypted:
        assert_no_plaintext_left(disk)
        archived = {r[0] for r in survived_rows(disk) if r[1] == "archived"}
        assert archived == set(sim.expected_archives()), "every recording archived, encrypted"
    else:
        assert_archive_complete(sim, disk / "archive", disk / "state.sqlite3")
    if manifest:
        await _verify_manifest_on(sim, disk, tmp_path)
    return result


async def _verify_manifest_on(sim: Simulator, disk: Path, tmp_path: Path) -> None:
    """``verify --manifest`` of the archive the cuts left, read where it lies (the disk's
    backing directory), with the state and, as an auditor would, with the public key alone."""
    cfg = write_config(tmp_path, sim, name="audit.toml", archive={"directory": str(disk / "archive")},
                       state={"database": str(disk / "state.sqlite3")})
    with_state = await run_cli("--config", str(cfg), "verify", "--manifest", "--public-key",
                               str(tmp_path / "signing.key.pub"))
    assert with_state.rc == 0 and " 0 problem(s)" in with_state.out, with_state
    cfg = write_config(tmp_path, sim, name="audit.toml", archive={"directory": str(disk / "archive")},
                       state={"database": str(tmp_path / "no-state.sqlite3")})
    alone = await run_cli("--config", str(cfg), "verify", "--manifest", "--public-key",
                          str(tmp_path / "signing.key.pub"))
    assert alone.rc == 0 and "without the state database" in alone.out, alone


@pytest.mark.timeout(300 * SCALE)
async def test_power_cuts_through_a_zip_backfill_lose_nothing(tmp_path: Path, make_sim: Any) -> None:
    require_fuse()
    sim = await make_sim(recordings=400, audio_bytes=6_000, late_files=6, files_after=2.0, pending=4,
                         end_after=2.0, faults={"server_500": 0.02, "storage_truncate": 0.02})
    cuts = 24 * SCALE
    result = await cut_power_repeatedly(sim, tmp_path, cuts=cuts, seed=16 + SEED, api={"page_size": 20},
                                        workers={"concurrency": 4})
    assert len(result.cuts) == cuts, result
    print(f"\n{len(result.cuts)} cuts ({sum(' random ' in c for c in result.cuts)} keeping a random part), "
          f"{result.finished_early} runs ended before their cut, archived at each cut: {result.archived_at_cut}")
    assert result.archived_at_cut[-1] > 0


@pytest.mark.timeout(300 * SCALE)
async def test_power_cuts_with_deletion_from_the_server(tmp_path: Path, make_sim: Any) -> None:
    """With the server's copy deleted once archived: nothing deleted whose copy did not survive.
    The signed manifest is on: no cut loses a line of it or leaves a torn segment."""
    require_fuse()
    sim = await make_sim(recordings=120, mode="wav", audio_bytes=6_000, late_files=3, files_after=2.0)
    result = await cut_power_repeatedly(
        sim, tmp_path, cuts=9 * SCALE, seed=17 + SEED, manifest=True, api={"page_size": 20},
        workers={"concurrency": 4}, retention={"delete_from_server": True, "delete_after": 0},
    )
    assert len(result.cuts) == 9 * SCALE, result
    assert set(sim.deletes) == set(sim.expected_archives()), "every archived recording freed on the server"
    assert all(n == 1 for n in sim.deletes.values()), "each deleted once"


@pytest.mark.timeout(300 * SCALE)
async def test_power_cuts_with_encryption_and_the_manifest(tmp_path: Path, make_sim: Any) -> None:
    """Encrypted to an age key, signed every half second, some bodies spilled to disk (over
    1 MB): no cut leaves plaintext audio under a final name, or anywhere once the archiver has
    run again; every body decrypts to the server's bytes; the manifest holds."""
    require_fuse()
    sim = await make_sim(recordings=150, audio_bytes=6_000, late_files=3, files_after=2.0)
    for _ in range(8):  # bodies over the 1 MB in-memory bound: the plaintext is staged, then encrypted
        sim.add_recording(body=make_zip([("a_in.wav", make_wav(os.urandom(700_000))),
                                         ("a_out.wav", make_wav(os.urandom(700_000)))]))
    result = await cut_power_repeatedly(
        sim, tmp_path, cuts=9 * SCALE, seed=19 + SEED, manifest=True, encrypted=True, api={"page_size": 20},
        workers={"concurrency": 4},
    )
    assert len(result.cuts) == 9 * SCALE, result


@pytest.mark.timeout(300 * SCALE)
async def test_power_cuts_through_a_listing_backfill_with_deletion(tmp_path: Path, make_sim: Any) -> None:
    """The storage listing's path (channel files fetched one by one, our own ZIP written) under
    power cuts, with the server's copy deleted once archived."""
    require_fuse()
    sim = await make_sim(recordings=150, audio_bytes=6_000, late_files=3, files_after=2.0,
                         faults={"storage_truncate": 0.02})
    result = await cut_power_repeatedly(
        sim, tmp_path, cuts=9 * SCALE, seed=18 + SEED, api={"page_size": 20, "storage_listing": True},
        workers={"concurrency": 4}, retention={"delete_from_server": True, "delete_after": 0},
    )
    assert len(result.cuts) == 9 * SCALE, result
    assert set(sim.deletes) == set(sim.expected_archives()), "every archived recording freed on the server"
    assert sim.stats["storage_file_requests"] > 0 and sim.stats["recordingfiles"] < 20, sim.stats



# Each mutation removes one fsync from the store path (the text must be found exactly once, so a
# refactoring that moves it makes this test fail loudly instead of passing vacuously).
MUTATIONS = {
    "no directory fsync after a store batch's renames": (
        "store.py", "                fsync_path(directory)\n", "                pass\n",
    ),
    "no fsync of a new directory into its parent": (
        "store.py", "        return\n    fsync_path(path.parent)\n", "        return\n",
    ),
    "no fsync of a body before its rename": (
        "store.py",
        "                if durable and fd is not None:\n                    os.fsync(fd)\n",
        "                if durable and fd is not None:\n                    pass\n",
    ),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
async def test_the_power_cut_checks_catch_a_missing_fsync(tmp_path: Path, make_sim: Any, mutation: str) -> None:
    """A backfill runs to its end, then the power goes before anything else syncs. The real
    code survives that; the same code with one fsync removed must fail the checks."""
    require_fuse()
    module, before, after = MUTATIONS[mutation]
    mutant = tmp_path / "mutant-code"
    shutil.copytree(REPO / "archiver", mutant / "archiver", ignore=shutil.ignore_patterns("__pycache__"))
    source = (mutant / "archiver" / module).read_text()
    assert source.count(before) == 1, f"the mutation no longer applies to {module}: update MUTATIONS"
    (mutant / "archiver" / module).write_text(source.replace(before, after))
    outcomes = {}
    for name, pythonpath in (("real", REPO), ("mutant", mutant)):
        sim = await make_sim(recordings=40, audio_bytes=6_000)
        run_dir = tmp_path / name
        run_dir.mkdir()
        mnt = run_dir / "mnt"
        cfg = write_config(run_dir, sim, archive={"directory": str(mnt / "archive")},
                           state={"database": str(mnt / "state.sqlite3")})
        mount = PowerCutMount(run_dir / "disk", mnt)
        rc = await boot_and_run(cfg, mount, None, run_dir / "run.log", env=cli_env(PYTHONPATH=str(pythonpath)),
                                cut_when_done=True)
        assert rc == 0, (run_dir / "run.log").read_text()[-3000:]
        try:
            check_survivors(sim, run_dir / "disk")
            outcomes[name] = "survived"
        except AssertionError as exc:
            outcomes[name] = str(exc).splitlines()[0]
    assert outcomes["real"] == "survived", outcomes
    assert outcomes["mutant"] != "survived", f"the power-cut checks did not notice: {mutation}"


async def test_a_disk_that_fails_mid_run_stops_the_archiver_cleanly(tmp_path: Path, make_sim: Any) -> None:
    """After the cut the filesystem answers EIO to everything, as a dead disk does. Left alone,
    the archiver must stop with a clear error: no helper crashing, no unexpected errors."""
    require_fuse()
    sim = await make_sim(recordings=200, audio_bytes=6_000)
    mnt = tmp_path / "mnt"
    cfg = write_config(tmp_path, sim, archive={"directory": str(mnt / "archive")},
                       state={"database": str(mnt / "state.sqlite3")}, workers={"concurrency": 4})
    mount = PowerCutMount(tmp_path / "disk", mnt).mount()
    mount.command("arm rename /archive/*.zip 20")
    log = tmp_path / "run.log"
    try:
        with open(log, "wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *cli_command("--config", str(cfg), "backfill", "--wait", "30"),
                stdout=out, stderr=out, env=cli_env(), cwd=tmp_path, start_new_session=True,
            )
        try:
            rc = await asyncio.wait_for(proc.wait(), 120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    finally:
        mount.unmount()
    text = log.read_text()
    assert mount.was_cut
    assert rc == 2, text[-3000:]  # the database is not usable on that disk: exit 2, no restart loop
    assert "cannot be used" in text or "cannot write the state database" in text, text[-3000:]
    for bad in ("store_helper_exited", "unexpected_error", "outcome_not_recorded"):
        assert bad not in text, f"{bad}: {text[-3000:]}"
