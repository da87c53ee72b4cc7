"""Before/after: the same backfill from two source trees, alternating, against one simulator.

    python bench/ab.py /path/to/before-tree               # this tree is "after"
    python bench/ab.py BEFORE --pairs 5 --recordings 1200 --latency 0.02 --concurrency 16

A change on a hot path comes with these figures: each pair runs the before tree, then this
one, on a fresh directory each; the ratios are taken pair by pair (after / before), so a
machine whose speed drifts during the session still gives a fair comparison. Every run must
archive every recording. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # the shared helpers beside this file


def one(tree: Path, sim: bench.Sim, work: Path, concurrency: int, listing: bool) -> dict[str, Any]:
    """One ``backfill --wait 0`` with ``tree``'s code (its PYTHONPATH)."""
    real_env = bench.env
    bench.env = lambda: {**real_env(), "PYTHONPATH": str(tree)}  # type: ignore[assignment]
    try:
        return bench.backfill(sim, work, concurrency, 0,
                              api=f"burst = 16\nstorage_listing = {'true' if listing else 'false'}\n")
    finally:
        bench.env = real_env  # type: ignore[assignment]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path, help="the source tree to compare against (a git worktree)")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--recordings", type=int, default=1200)
    p.add_argument("--latency", type=float, default=0.02)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--mode", default="zip", choices=("zip", "wav"))
    p.add_argument("--audio-bytes", type=int, default=169_920)
    p.add_argument("--fetch", default="recordingfiles", choices=("recordingfiles", "listing"))
    args = p.parse_args()
    after = bench.REPO
    sim = bench.Sim("--recordings", str(args.recordings), "--latency", str(args.latency), "--no-rate-limit",
                    "--mode", args.mode, "--audio-bytes", str(args.audio_bytes))
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    try:
        with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
            root = Path(tmp)
            for i in range(-1, args.pairs):  # pair -1: a warm-up, not counted
                for name, tree in (("before", args.before.resolve()), ("after", after)):
                    work = root / f"{name}-{i}"
                    work.mkdir()
                    result = one(tree, sim, work, args.concurrency, args.fetch == "listing")
                    bench.recycle(work, args.audio_bytes)
                    if i >= 0:
                        runs[name].append(result)
    finally:
        sim.stop()
    n = args.recordings
    print(f"N={n} of {args.audio_bytes / 1e6:.1f} MB L={args.latency * 1000:.0f}ms C={args.concurrency}"
          f" mode={args.mode} fetch={args.fetch}, {args.pairs} pairs")
    print("| | wall, median (min-max) | CPU-s per 1,000, median (min-max) |")
    print("|---|---|---|")
    for name in ("before", "after"):
        walls = [r["wall"] for r in runs[name]]
        cpus = [1000 * r["cpu"] / n for r in runs[name]]
        print(f"| {name} | {statistics.median(walls):.2f} s ({min(walls):.2f}-{max(walls):.2f}) |"
              f" {statistics.median(cpus):.2f} ({min(cpus):.2f}-{max(cpus):.2f}) |")
    wall_ratios = [a["wall"] / b["wall"] for a, b in zip(runs["after"], runs["before"], strict=True)]
    cpu_ratios = [a["cpu"] / b["cpu"] for a, b in zip(runs["after"], runs["before"], strict=True)]
    print("after/before per pair: wall " + ", ".join(f"{r:.2f}" for r in wall_ratios)
          + f" (median {statistics.median(wall_ratios):.2f}); CPU " + ", ".join(f"{r:.2f}" for r in cpu_ratios)
          + f" (median {statistics.median(cpu_ratios):.2f})")


if __name__ == "__main__":
    main()
