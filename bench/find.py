"""``find`` on a large state: the real CLI, as a whole command, against a SQLite state of N
recordings (default 1,000,000) over three years, each call with its numbers.

    python bench/find.py                      # 1,000,000 recordings, 5 runs of each query
    python bench/find.py --recordings 200000 --runs 3

The state is built once with the real schema (``StateDB.open``) and filled in bulk; then each
query runs ``voipbin-archiver find ... --json`` ``--runs`` times (wall: min and median) beside
``python -c pass`` (the interpreter alone, the floor a command cannot go under). The goal of #29:
at most 1 s for a number or a month on 1,000,000 recordings. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from archiver.state.base import CALL_COLUMNS  # noqa: E402
from archiver.state.sqlite import StateDB  # noqa: E402

START = datetime(2024, 1, 1, tzinfo=UTC)
SPAN = 3 * 365 * 86400  # seconds: three years


def build(db: Path, n: int) -> tuple[str, str]:
    """N recordings (one in seven a conference), a call for each other, numbers from a pool so
    that a number has a few dozen calls; returns (a number, a call id) to look for."""
    asyncio.run(_create(db))
    rng = random.Random(7)
    con = sqlite3.connect(db)
    con.execute("PRAGMA synchronous=OFF")
    theirs = [f"4930{rng.randrange(10**7):07d}" for _ in range(max(1, n // 30))]
    ours = [f"1415555{i:04d}" for i in range(100)]
    probe_number, probe_call = theirs[0], ""
    batch_r: list[tuple] = []
    batch_c: list[tuple] = []
    now = time.time()
    for i in range(n):
        rec_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        call_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        start = START.timestamp() + SPAN * i / n
        conf = i % 7 == 6
        ref_type = "confbridge" if conf else "call"
        raw = json.dumps({"id": rec_id, "reference_type": ref_type, "reference_id": call_id, "status": "ended"})
        batch_r.append(("default", rec_id, "archived", raw, "ended", ref_type, start - 2, start + 60, now, now,
                        f"{datetime.fromtimestamp(start, UTC):%Y/%m/%d}/{rec_id}.zip", 170_000, "ab" * 32,
                        2, now, start, call_id))
        if not conf:
            incoming = rng.random() < 0.5
            a = rng.choice(theirs) if i else probe_number
            b = rng.choice(ours)
            src, dst = (a, b) if incoming else (b, a)
            if not probe_call:
                probe_call = call_id
            call_raw = json.dumps({"id": call_id, "direction": "incoming" if incoming else "outgoing",
                                   "source": {"type": "tel", "target": "+" + src},
                                   "destination": {"type": "tel", "target": "+" + dst},
                                   "status": "hangup", "hangup_reason": "normal", "recording_ids": [rec_id]})
            batch_c.append(("default", call_id, call_raw, "incoming" if incoming else "outgoing", "hangup", src, dst,
                            "+" + src, "+" + dst, "normal", start - 5, now, now))
        if len(batch_r) >= 50_000:
            _flush(con, batch_r, batch_c)
    _flush(con, batch_r, batch_c)
    con.execute("ANALYZE")
    con.commit()
    con.close()
    return probe_number, probe_call


async def _create(db: Path) -> None:
    state = await StateDB.open(db)
    await state.close()


def _flush(con: sqlite3.Connection, recs: list[tuple], calls: list[tuple]) -> None:
    con.executemany(
        "INSERT INTO recordings (account, id, state, raw, status, reference_type, tm_create, tm_end, discovered_at,"
        " updated_at, path, size, sha256, members, archived_at, tm_start, reference_id)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", recs)
    con.executemany(
        f"INSERT INTO calls ({CALL_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", calls)
    con.commit()
    recs.clear()
    calls.clear()


def timed(cmd: list[str], runs: int) -> tuple[float, float, int]:
    """(min, median wall seconds, lines printed) of ``cmd`` over ``runs``."""
    times = []
    lines = 0
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - started)
        if done.returncode not in (0, 1):
            raise SystemExit(f"{cmd}: exit {done.returncode}: {done.stderr[-2000:]}")
        lines = len(done.stdout.splitlines())
    return min(times), statistics.median(times), lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recordings", type=int, default=1_000_000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--keep", type=Path, help="build (or reuse) the state here instead of a temporary directory")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="find-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        db = work / f"state-{args.recordings}.sqlite3"
        probe = work / f"state-{args.recordings}.probe"
        if not db.exists():
            started = time.perf_counter()
            number, call = build(db, args.recordings)
            probe.write_text(f"{number} {call}")
            print(f"built {args.recordings:,} recordings in {time.perf_counter() - started:.0f} s "
                  f"({db.stat().st_size / 1e6:.0f} MB)")
        number, call = probe.read_text().split()
        cfg = work / "config.toml"
        cfg.write_text(f'[state]\ndatabase = "{db}"\n[api]\naccesskey = "vb_{"0" * 32}"\n')
        month = START + timedelta(days=430)
        base = [sys.executable, "-m", "archiver", "--config", str(cfg), "find", "--json"]
        queries = {
            "number (+, 00 and bare)": [*base, "--number", "00" + number],
            "a month": [*base, "--since", f"{month:%Y-%m}", "--until", f"{month + timedelta(days=31):%Y-%m}"],
            "a call": [*base, "--call", call],
            "a number in a month": [*base, "--number", "+" + number, "--since", "2024-01", "--until", "2024-02"],
            "a month, as a table": [c for c in base if c != "--json"] + [
                "--since", f"{month:%Y-%m}", "--until", f"{month + timedelta(days=31):%Y-%m}"],
        }
        floor = timed([sys.executable, "-c", "import archiver.cli"], args.runs)
        print(f"N={args.recordings:,}, {args.runs} runs each; the floor (python + importing the CLI): "
              f"min {floor[0]:.3f} s, median {floor[1]:.3f} s")
        print("| query | results | wall min | wall median | of the 1 s goal | median - floor |")
        print("|---|---|---|---|---|---|")
        for name, cmd in queries.items():
            low, mid, lines = timed(cmd, args.runs)
            print(f"| {name} | {lines:,} | {low:.3f} s | {mid:.3f} s | {mid:.0%} | {mid - floor[1]:.3f} s |")


if __name__ == "__main__":
    main()
