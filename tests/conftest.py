"""Shared fixtures: a real simulator on 127.0.0.1, a config file, the real CLI as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from archiver.simulator import MultiSimulator, SimConfig, Simulator

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def rgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Ceph RADOS Gateway for the session (``tests/rgw.py``), or the test is skipped."""
    from tests.rgw import RGW, missing_binaries

    missing = missing_binaries()
    if missing:
        pytest.skip(f"Ceph RGW not installed (missing {', '.join(missing)}; apt-get install radosgw ceph-mon ceph-osd)")
    gateway = RGW(tmp_path_factory.mktemp("rgw")).start()
    try:
        yield gateway
    finally:
        gateway.close()
        shutil.rmtree(gateway.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """A PostgreSQL cluster for the session (``tests/pg.py``), or the test is skipped."""
    from tests.pg import PgCluster

    if not PgCluster.installed():
        pytest.skip("needs PostgreSQL (Debian: apt-get install postgresql-15)")
    cluster = PgCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture
async def make_sim() -> AsyncIterator[Callable[..., Any]]:
    """``await make_sim(**SimConfig fields)``: a simulator started, stopped after the test."""
    async with _simulators(lambda **kwargs: Simulator(SimConfig(**kwargs))) as factory:
        yield factory


@pytest.fixture
async def multi_sim() -> AsyncIterator[Callable[..., Any]]:
    """``await multi_sim(names, **SimConfig fields)``: one simulator per account behind one port."""
    async with _simulators(lambda names, **kwargs: MultiSimulator({n: SimConfig(**kwargs) for n in names})) as factory:
        yield factory


@contextlib.asynccontextmanager
async def _simulators(build: Callable[..., Any]) -> AsyncIterator[Callable[..., Any]]:
    """A factory of started simulators (no rate limit unless asked), each stopped at the end."""
    started: list[Any] = []

    async def factory(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("rate_limit", False)
        sim = build(*args, **kwargs)
        await sim.start()
        started.append(sim)
        return sim

    try:
        yield factory
    finally:
        for sim in started:
            await sim.stop()


def toml_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(directory: Path, sim: Simulator | None, name: str = "config.toml", extra: list[str] | None = None,
                 **sections: dict[str, Any]) -> Path:
    """A config for ``sim`` in ``directory``, fast test defaults, overridable per section;
    ``extra`` lines (``[[accounts]]`` tables) at the end."""
    base: dict[str, dict[str, Any]] = {
        # storage_listing off unless a test asks: most tests check today's /recordingfiles path byte
        # for byte; tests/test_listing.py and the listing variants of the e2e tests check the other
        "api": {"requests_per_second": 0, "retry_base": 0.01, "retry_max": 0.05, "timeout": 10,
                "storage_listing": False},
        "archive": {"directory": "archive", "settle_window": 60},
        "state": {"database": "state.sqlite3"},
        "workers": {"concurrency": 8, "poll_backoff_min": 0.2, "poll_backoff_max": 0.5,
                    "retry_backoff_min": 0.05, "retry_backoff_max": 0.2, "poll_interval": 0.5},
    }
    if sim is not None:
        base["api"].update(base_url=sim.base_url, accesskey=sim.accesskey)
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    lines = []
    for section, values in base.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None]
    path = directory / name
    path.write_text("\n".join([*lines, *(extra or [])]) + "\n")
    path.chmod(0o600)
    return path


class Proc:
    def __init__(self, rc: int, out: str, err: str) -> None:
        self.rc, self.out, self.err = rc, out, err

    def __repr__(self) -> str:
        return f"Proc(rc={self.rc}, out={self.out[-2000:]!r}, err={self.err[-4000:]!r})"


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "archiver", *args]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOIPBIN_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


async def run_cli(*args: str, timeout: float = 120, cwd: Path | None = None, env: dict[str, str] | None = None) -> Proc:
    """Run the real CLI in a subprocess while this event loop keeps serving the simulator."""
    proc = await asyncio.create_subprocess_exec(
        *cli_command(*args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=cwd, env=env or cli_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(f"CLI {args} timed out: {err.decode()[-3000:]}") from None
    return Proc(proc.returncode or 0, out.decode(), err.decode())


@contextlib.asynccontextmanager
async def running_service(cfg: Path, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """The real ``run`` (the service) in a subprocess logging to ``log``; SIGTERM and its exit
    awaited when the block ends (its return code is then the process's)."""
    out = open(log, "wb")
    proc = await asyncio.create_subprocess_exec(*cli_command("--config", str(cfg), "run"), stdout=out, stderr=out,
                                                env=cli_env())
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
        out.close()


def db_rows(db: Path, sql: str = "SELECT id, state, path, sha256, last_error FROM recordings") -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
                     progress: Callable[[], object] | None = None) -> None:
    """Poll ``predicate`` until true or fail after ``timeout`` seconds (no blind sleeps);
    ``progress`` says how far it got, in the failure."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            got = f" (got {progress()})" if progress is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{got}")
        await asyncio.sleep(0.05)


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (created) for the block: a disk that fills up or
    can be remounted read-only. Skips the test where it cannot be mounted (needs root)."""
    path.mkdir()
    mounted = os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    ).returncode == 0
    if not mounted:
        pytest.skip("needs root and tmpfs to make a small disk")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (for /metrics in a test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def http_get(http: Any, url: str) -> tuple[int, str]:
    """(status, text) of a GET, (0, "") while nothing listens there yet."""
    try:
        async with http.get(url) as resp:
            return resp.status, await resp.text()
    except aiohttp.ClientError:
        return 0, ""


async def body_when(http: Any, url: str, ready: Callable[[str], bool], timeout: float, what: str) -> str:
    """The text a GET of ``url`` answers once ``ready`` holds for it (a ``/metrics`` that shows a
    count); fails after ``timeout`` seconds with the last text seen."""
    deadline = time.monotonic() + timeout
    while not ready(body := (await http_get(http, url))[1]):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last answer: {body[-2000:]}")
        await asyncio.sleep(0.05)
    return body


def archive_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def archived_this_run(out: str) -> int:
    """The "this run" archived count from a backfill's summary table."""
    for line in out.splitlines():
        parts = line.split()
        if parts[:1] == ["archived"]:
            return int(parts[1])
    raise AssertionError(f"no summary in {out!r}")


# The fast loop, `pytest -m "not slow"`: every module is still exercised, by the quicker of its
# tests; these (each over ~3 s on 2 cores, or a power-cut run) wait for CI and `pytest` alone.
# Whole modules by file, single tests by function name (every parametrisation of it).
SLOW_MODULES = {"test_powercut.py"}
SLOW = {
    "test_accounts.py": {"test_a_backfill_of_three_accounts_keeps_each_apart",
                         "test_the_service_pauses_a_frozen_account_and_serves_the_others"},
    "test_backfill.py": {"test_pending_timeout_is_judged_on_a_fresh_poll"},
    "test_chaos.py": {"test_chaos_kill9_with_faults"},
    "test_cli.py": {"test_demo_leaves_a_config_for_status_and_verify"},
    "test_crash.py": {"test_sigkill_mid_backfill_then_resume",
                      "test_sigterm_during_a_slow_walk_stops_within_seconds_and_resumes_from_the_checkpoint",
                      "test_store_helpers_killed_mid_backfill_are_replaced_and_nothing_is_lost"},
    "test_find.py": {"test_find_and_export_answer_from_a_locked_bucket"},
    "test_faults.py": {"test_a_dripping_storage_answer_cannot_hold_a_backfill",
                       "test_rate_limit_429_is_honoured_and_slows_the_pool"},
    "test_fuzz.py": {"test_error_bodies", "test_listing_pages", "test_timestamps", "test_zip_extraction_stays_inside",
                     "test_zip_inspector"},
    "test_pg.py": {"test_a_backfill_waits_for_a_dead_daemons_claims",
                   "test_a_daemon_stopped_past_its_lease_is_taken_over_without_a_second_copy",
                   "test_a_database_not_up_yet_is_exit_1_for_systemd_to_retry", "test_a_slow_transfer_keeps_its_lease",
                   "test_the_database_going_away_pauses_the_service_and_loses_nothing",
                   "test_three_daemons_share_four_accounts_and_survive_a_kill",
                   "test_two_daemons_delete_each_server_copy_once_with_one_audit_trail",
                   "test_two_daemons_share_one_bucket"},
    "test_realserver.py": {"test_a_429_while_under_our_pace_says_once_that_others_use_the_budget",
                           "test_default_pace_leaves_half_the_shared_budget_and_meets_no_429",
                           "test_frozen_account_mid_backfill_exits_3_counts_nothing_and_a_plain_rerun_finishes",
                           "test_login_429_and_5xx_are_transient_not_a_refused_credential",
                           "test_recordings_without_audio_get_their_own_state_and_keep_their_metadata",
                           "test_wait_bounds_the_backfill_with_a_request_that_hangs"},
    "test_retention.py": {"test_dry_run_and_what_is_never_due",
                          "test_kill_9_around_the_delete_leaves_exactly_one_deletion_and_one_audit_line",
                          "test_service_keeps_a_capped_store_flowing_and_deletes_each_copy_once_after_it_is_safe"},
    "test_s3.py": {"test_a_corrupted_upload_is_refused_by_the_store_and_sent_again", "test_a_large_body_goes_multipart",
                   "test_a_lost_answer_without_the_versions_listing_permission",
                   "test_a_lost_database_is_rebuilt_from_the_bucket_without_uploading_again",
                   "test_an_upload_whose_commit_was_lost_is_adopted_not_uploaded_again",
                   "test_backfill_to_a_compliance_bucket", "test_deleting_the_server_copy_re_verifies_the_object_first",
                   "test_sigkill_mid_backfill_then_resume",
                   "test_the_gateway_going_away_pauses_the_service_and_loses_nothing",
                   "test_verify_catches_an_object_replaced_out_of_band"},
    "test_service.py": {"test_backfill_off_a_terminal_logs_progress_events"},
    "test_state.py": {"test_a_corrupt_database_is_a_clear_exit_2_that_releases_the_lock"},
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the slow tests (``SLOW``); a name there that no test has any more is an error, so
    a rename cannot quietly move a slow test into the fast loop."""
    seen: set[tuple[str, str]] = set()
    for item in items:
        module = item.path.name
        name = getattr(item, "originalname", item.name)
        if module in SLOW_MODULES or name in SLOW.get(module, ()):
            item.add_marker(pytest.mark.slow)
            seen.add((module, name))
    collected = {item.path.name for item in items}
    missing = [f"{m}::{n}" for m, names in SLOW.items() if m in collected for n in names if (m, n) not in seen]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py SLOW names tests that do not exist: {missing}")
