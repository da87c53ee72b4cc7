"""Scale-out: 1, 2 and 4 daemons (``run``) on one PostgreSQL against a simulator of 8
rate-limited accounts, on this machine.

    python bench/scaleout.py [--accounts 8] [--per-account 150] [--rate 4] [--daemons 1,2,4]

Reports, per daemon count, aggregate recordings/s against the bound the accounts' paces set
(the sum of their rates over the API requests one recording takes), CPU per 1,000 recordings
(the daemons and their store helpers, from their start to the moment all is archived),
database transactions per recording (``pg_stat_database``: each statement outside a
transaction is one) and statements per recording (round trips: the server logs each, with
``log_statement``); then 10 s at rest: transactions per second and CPU. Needs PostgreSQL
(``initdb``, ``pg_ctl``) and asyncpg. Appends to bench/results.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from archiver.simulator import MultiSimulator, SimConfig  # noqa: E402
from tests.pg import PgCluster  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from run import process_cpu  # noqa: E402


def _config(work: Path, sim: MultiSimulator, url: str, rate: float, n: int) -> Path:
    lines = [
        "[api]", f'base_url = "{sim.base_url}"', "timeout = 30",
        "[archive]", f'directory = "{work / "archive"}"', "settle_window = 60",
        "[state]", f'database = "{work / "state.sqlite3"}"', f'url = "{url}"', "lease = 30",
        "[workers]", "concurrency = 4", "poll_interval = 1", "store_processes = 1",
        "[logging]", 'level = "warning"', 'format = "json"',
    ]
    for name, account in sim.accounts.items():
        key = work / f"{name}.key"
        key.write_text(account.accesskey)
        lines += ["[[accounts]]", f'name = "{name}"', f'accesskey_file = "{key}"',
                  f"requests_per_second = {rate}", f"burst = {max(1, int(rate))}"]
    path = work / f"daemon{n}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def _transactions(url: str) -> int:
    con = await asyncpg.connect(url)
    try:
        return int(await con.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"))
    finally:
        await con.close()


async def _archived(url: str) -> int:
    con = await asyncpg.connect(url)
    try:
        return int(await con.fetchval("SELECT count(*) FROM recordings WHERE state = 'archived'"))
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await con.close()


async def one_run(cluster: PgCluster, daemons: int, accounts: int, per_account: int, rate: float) -> dict[str, float]:
    sim = MultiSimulator({f"acct-{i}": SimConfig(recordings=per_account, pending=0, late_files=0, deleted=0,
                                                 audio_bytes=20_000, rate_limit=True)
                          for i in range(accounts)})
    await sim.start()
    db = "s_" + secrets.token_hex(4)
    admin = await asyncpg.connect(cluster.url())
    await admin.execute(f"CREATE DATABASE {db}")
    await admin.execute(f"ALTER DATABASE {db} SET log_statement = 'all'")  # each statement a log line: counted
    await admin.close()
    log = cluster.base / "log"
    log_start = log.stat().st_size
    url = cluster.url(db)
    total = accounts * per_account
    with tempfile.TemporaryDirectory(prefix="scaleout-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        started = time.monotonic()
        procs = [await asyncio.create_subprocess_exec(
            sys.executable, "-m", "archiver", "--config", str(_config(work, sim, url, rate, n)), "run",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=env) for n in range(daemons)]
        polls = 1
        while await _archived(url) < total:  # another process's progress, polled
            polls += 1
            await asyncio.sleep(0.2)
        elapsed = time.monotonic() - started
        tx = await _transactions(url)
        statements = _statements(log, log_start) - polls - 1  # less our own polls and the count above
        requests = sum(s.stats["api_requests"] for s in sim.accounts.values())  # (before the rest's cycles)
        cpu_idle = _cpu([p.pid for p in procs])  # then nothing is due: what the daemons cost at rest
        await asyncio.sleep(IDLE_WINDOW)
        idle_tx = (await _transactions(url) - tx - 1) / IDLE_WINDOW  # (less our own count's)
        idle_cpu = (_cpu([p.pid for p in procs]) - cpu_idle) / IDLE_WINDOW
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            await proc.wait()
    limited = sum(s.stats["http_429"] for s in sim.accounts.values())
    await sim.stop()
    cpu = cpu_idle  # up to the moment everything was archived (not the rest, not the shutdown)
    per_recording = requests / total
    bound = accounts * rate / per_recording
    return {"daemons": daemons, "seconds": elapsed, "rate": total / elapsed, "bound": bound,
            "of_bound": total / elapsed / bound, "cpu_per_1000": 1000 * cpu / total,
            "tx_per_recording": tx / total, "statements_per_recording": statements / total,
            "requests_per_recording": per_recording, "http_429": limited,
            "idle_tx": idle_tx, "idle_cpu": idle_cpu}


IDLE_WINDOW = 10.0  # seconds measured at rest once everything is archived


def _statements(log: Path, start: int) -> int:
    """Statements the server logged since ``start`` (a byte offset): each one round trip (a
    simple query, or an extended-protocol execute; BEGIN and COMMIT count too)."""
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", "replace")
    return sum(1 for line in text.splitlines() if "LOG:  statement: " in line or "LOG:  execute " in line)


def _cpu(pids: list[int]) -> float:
    """CPU seconds so far of these processes and their live children (the store helpers)."""
    return sum(process_cpu(pid, children=True) for pid in pids)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--accounts", type=int, default=8)
    p.add_argument("--per-account", type=int, default=150)
    p.add_argument("--rate", type=float, default=4.0)
    p.add_argument("--daemons", default="1,2,4")
    args = p.parse_args()
    cluster = PgCluster().start()
    rows = []
    try:
        for n in (int(x) for x in args.daemons.split(",")):
            row = await one_run(cluster, n, args.accounts, args.per_account, args.rate)
            rows.append(row)
            print(row, flush=True)
    finally:
        cluster.stop()
    lines = [
        f"\n## scale-out, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {args.accounts} accounts x {args.per_account} "
        f"recordings at {args.rate}/s each, one PostgreSQL, daemons on this machine ({os.cpu_count()} cores)\n",
        "| daemons | recordings/s | bound | of bound | CPU-s per 1,000 | DB transactions (statements) per recording "
        "| API requests per recording | 429s | at rest: DB transactions/s, CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['daemons']:.0f} | {r['rate']:.1f} | {r['bound']:.1f} | {100 * r['of_bound']:.0f} % "
                     f"| {r['cpu_per_1000']:.2f} | {r['tx_per_recording']:.1f} ({r['statements_per_recording']:.1f}) "
                     f"| {r['requests_per_recording']:.2f} "
                     f"| {r['http_429']:.0f} | {r['idle_tx']:.1f}, {100 * r['idle_cpu']:.1f} % of a core |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(REPO / "bench" / "results.md", "a") as f:
        f.write(text)


if __name__ == "__main__":
    asyncio.run(main())
