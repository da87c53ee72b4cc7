"""Where the daemon's CPU goes: one ``backfill --wait 0`` of the throughput workload, sampled
by py-spy (``pip install py-spy``), summed by function (own time) and by our module
(inclusive time).

    python bench/profile.py                       # 1,200 ZIPs of 171 kB, L = 20 ms, C = 16
    python bench/profile.py --recordings 3000 --mode wav
    python bench/profile.py --postgres             # the state in PostgreSQL (needs asyncpg, postgresql-15)

Runs the backfill plain at N and 3N recordings (the CPU per 1,000, from the rusage of the
daemon and its store helpers, and the marginal CPU per 1,000 without the start-up), then at N
under py-spy (``--gil``: Python's own CPU), and prints the top of the profile. Not part
of the test suite; the figures go to the README's Benchmarks section by hand.
"""

from __future__ import annotations

import argparse
import collections
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import Sim, env, process_cpu, quiet_filesystem, write_config


def _frames(line: str) -> tuple[list[str], int]:
    stack, _, count = line.rpartition(" ")
    return stack.split(";"), int(count)


def summarize(raw: Path, top: int) -> list[str]:
    own: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    processes: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        frames, count = _frames(line)
        total += count
        processes["store helpers" if "storeproc" in line else "daemon"] += count
        if frames:
            own[frames[-1].split(" (")[0] + " " + _where(frames[-1])] += count
        for module in {_module(f) for f in frames if "archiver/" in f}:
            ours[module] += count
        for function in {f.split(" (")[0] + " " + _where(f) for f in frames if "archiver/" in f}:
            functions[function] += count
    out = [f"samples: {total} ({', '.join(f'{k} {100 * n / total:.0f} %' for k, n in processes.items())})",
           "", "own time (top functions):"]
    out += [f"  {100 * n / total:5.1f} %  {name}" for name, n in own.most_common(top)]
    out += ["", "inclusive time by archiver function:"]
    out += [f"  {100 * n / total:5.1f} %  {name}" for name, n in functions.most_common(top)]
    out += ["", "inclusive time by archiver module:"]
    out += [f"  {100 * n / total:5.1f} %  {name}" for name, n in ours.most_common()]
    return out


def _where(frame: str) -> str:
    inside = frame.partition(" (")[2].rstrip(")")
    path = inside.rpartition(":")[0]
    return Path(path).name if path else "?"


def _module(frame: str) -> str:
    inside = frame.partition(" (")[2].rstrip(")")
    return "archiver/" + inside.rpartition(":")[0].partition("archiver/")[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recordings", type=int, default=1200)
    p.add_argument("--latency", type=float, default=0.02)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--mode", default="zip")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--output", default="profile.txt", help="py-spy's raw samples (collapsed stacks), kept")
    p.add_argument("--postgres", action="store_true",
                   help="the state in a throwaway PostgreSQL (tests/pg.py) instead of SQLite, a database per run")
    args = p.parse_args()
    args.cluster = None
    if args.postgres:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.pg import PgCluster

        args.cluster = PgCluster().start()
    try:
        _profile(args)
    finally:
        if args.cluster is not None:
            args.cluster.stop()


def _profile(args: argparse.Namespace) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    root = Path(tempfile.mkdtemp(prefix="archiver-profile-"))
    create_us = quiet_filesystem(root / "probe")  # a recent mass delete makes every create slow
    print(f"file create {create_us:.0f} µs")
    try:  # nothing is deleted until every run is done (see quiet_filesystem)
        plain = {n: _backfill(root, args, n) for n in (args.recordings, args.recordings * 3)}
        (n1, (cpu1, _)), (n3, (cpu3, _)) = plain.items()
        print(f"marginal: {1000 * (cpu3 - cpu1) / (n3 - n1):.2f} CPU-s per 1,000 recordings "
              f"(the runs of {n1} and {n3}; start-up {cpu1 - n1 * (cpu3 - cpu1) / (n3 - n1):.2f} CPU-s)")
        raw = Path(args.output)
        _backfill(root, args, args.recordings, [
            spy, "record", "--format", "raw", "--rate", str(args.rate), "--nonblocking", "--subprocesses",
            "--gil",  # only what holds the GIL: Python's CPU, not a wait in a system call
            "--output", str(raw), "--"])
        print("\n".join(summarize(raw, args.top)))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _backfill(root: Path, args: argparse.Namespace, n: int, wrapper: list[str] | None = None) -> tuple[float, float]:
    """One ``backfill --wait 0`` of ``n`` recordings from a simulator of its own: (CPU-s, wall)."""
    work = root / f"{n}-{'profiled' if wrapper else 'plain'}"
    work.mkdir()
    sim = Sim("--recordings", str(n), "--latency", str(args.latency), "--no-rate-limit", "--mode", args.mode)
    try:
        url = ""
        if args.cluster is not None:
            name = f"bench_{work.name.replace('-', '_')}"
            subprocess.run([*args.cluster.as_user, str(args.cluster.bindir / "createdb"), "-h", "127.0.0.1", "-p",
                            str(args.cluster.port), "-U", "postgres", name], check=True)
            url = args.cluster.url(name)
        cfg = write_config(work, sim, args.concurrency, 0, state_url=url)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        db_before = _pg_cpu(args.cluster)
        start = time.monotonic()
        subprocess.run([*(wrapper or []), sys.executable, "-m", "archiver", "--config", str(cfg), "backfill",
                        "--wait", "0"], cwd=work, env=env(), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        wall = time.monotonic() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        db = _pg_cpu(args.cluster) - db_before
    finally:
        sim.stop()
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    if args.cluster is not None:
        print(f"  PostgreSQL beside it: {1000 * db / n:.2f} CPU-s per 1,000")
    print(f"{n} recordings ({args.mode}) in {wall:.2f} s: {1000 * (user + system) / n:.2f} CPU-s per 1,000 "
          f"(daemon and helpers{', py-spy too' if wrapper else ''}; {system / (user + system):.0%} in the kernel)")
    return user + system, wall


def _pg_cpu(cluster: object | None) -> float:
    """CPU seconds of the cluster so far: the postmaster, the backends it reaped, the live ones."""
    if cluster is None:
        return 0.0
    pid = int((cluster.data / "postmaster.pid").read_text().split()[0])  # type: ignore[attr-defined]
    return process_cpu(pid, children=True, reaped=True)


if __name__ == "__main__":
    main()
