"""Chaos: 1,000+ recordings, faults on, SIGKILL at random moments, restart each time.

At the end every ended recording is archived exactly once with correct bytes, no temporary
file remains, no file exists that SQLite does not know, and ``verify`` passes.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

from tests.checks import assert_archive_complete
from tests.conftest import cli_command, cli_env, run_cli, write_config
from tests.test_crash import _archived

FAULTS = {
    "api_500": 0.03, "api_reset": 0.02, "api_503": 0.03, "malformed_json": 0.02,
    "storage_truncate": 0.03, "storage_corrupt": 0.03, "storage_bad_hash": 0.02, "storage_expired": 0.03,
}


async def test_chaos_kill9_with_faults(tmp_path, make_sim):
    seed = int(os.environ.get("CHAOS_SEED") or time.time())
    print(f"chaos seed={seed} (CHAOS_SEED={seed} reruns it)")  # pytest shows it with any failure
    rng = random.Random(seed)
    sim = await make_sim(recordings=1100, audio_bytes=3000, latency=0.002, faults=FAULTS, pending=10,
                         late_files=10, deleted=10, end_after=2.0, files_after=2.0, seed=seed)
    cfg = write_config(tmp_path, sim, api={"page_size": 50, "max_retries": 8},
                       workers={"concurrency": 8, "max_attempts": 30})
    db = tmp_path / "state.sqlite3"
    kills = 0
    # kill at random points of progress (not of time, which depends on the machine), each time
    # a little after a random number of recordings is archived, to land in different phases
    thresholds = sorted(rng.sample(range(50, 1000), 4))
    for threshold in thresholds:
        proc = await asyncio.create_subprocess_exec(
            *cli_command("--config", str(cfg), "backfill", "--wait", "30"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=cli_env(),
        )
        waiter = asyncio.create_task(proc.wait())
        while not waiter.done() and _archived(db) < threshold:
            await asyncio.wait({waiter}, timeout=0.01)
        if not waiter.done():
            await asyncio.wait({waiter}, timeout=rng.uniform(0, 0.05))
        if not waiter.done():
            proc.send_signal(signal.SIGKILL)
            kills += 1
        await waiter
    final = await run_cli("--config", str(cfg), "backfill", "--wait", "60", timeout=240)
    if final.rc != 0:
        print(final.out, final.err[-6000:], sep="\n")  # shown by pytest with the failure
    assert final.rc == 0, f"seed {seed}: the final backfill exited {final.rc}"
    assert kills >= 3, f"seed {seed}: thresholds {thresholds}: the runs ended before they could be killed"
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")
    verify = await run_cli("--config", str(cfg), "verify")
    assert verify.rc == 0, verify
    injected = sum(v for k, v in sim.stats.items() if k.startswith("fault_"))
    print(f"chaos seed={seed} kills={kills} recordings={len(sim.expected_archives())} faults={injected}")
