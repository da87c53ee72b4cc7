"""The CPU floor of our checks: what verifying and durably storing one recording of the
throughput workload costs at the least, each step alone in a tight loop with no daemon around it.

    python bench/floor.py                 # the simulator's ZIP bodies (171 kB), 2,000 rounds
    python bench/floor.py --mode wav

Each step is what the store helper does per recording, done by the same libraries: the three
hashes of the body (SHA-256 for us, MD5 and CRC32C for the server's ``x-goog-hash``), the ZIP
check (inflate every member, its CRC-32, the WAV structure), the sidecar's JSON, and the two
files (body, sidecar) written to a temporary name, fsynced and renamed, with one directory
fsync per 8 recordings (a helper's batch). Their sum is the floor for ``CPU-s per 1,000
recordings`` before any HTTP, state or event-loop work; compare a backfill's figure
(``bench/profile.py``) and aria2c's (``bench/run.py``, HTTP and write only) with it.

Then the HTTP floor: the two requests a recording needs (``/recordingfiles/{id}``, its 307 to
storage, and the storage GET of the body), through aiohttp and nothing else of ours, 16 at a
time, against the simulator in its own process (its CPU is not counted). Not part of the test
suite.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import aiohttp
from run import Sim, quiet_filesystem

from archiver.config import ArchiveConfig
from archiver.inspect import BodyDigest, ZipLimits, inspect_zip
from archiver.simulator import SimConfig, Simulator
from archiver.store import Store, StoreJob, write_file_atomic


def cpu() -> float:
    """This process's user + system CPU seconds (the kernel's share of a write and fsync counts)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def per_round(step: Callable[[int], object], rounds: int) -> float:
    """Microseconds of CPU per call of ``step`` (the best of three passes: the floor, not noise)."""
    best = float("inf")
    for _ in range(3):
        before = cpu()
        for i in range(rounds):
            step(i)
        best = min(best, (cpu() - before) / rounds * 1e6)
    return best


async def http_pass(sim: Sim, ids: list[str], concurrency: int) -> None:
    """Each id's signed URL (the 307's Location), then its body, ``concurrency`` at a time."""
    queue = list(reversed(ids))
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            while queue:
                rec_id = queue.pop()
                async with session.get(f"{sim.base_url}/recordingfiles/{rec_id}", params={"accesskey": sim.accesskey},
                                       allow_redirects=False) as resp:
                    await resp.read()
                    location = resp.headers["Location"]
                async with session.get(location, allow_redirects=False) as resp:
                    async for _ in resp.content.iter_chunked(1 << 20):
                        pass

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def http_floor(recordings: int, mode: str, concurrency: int) -> float:
    """Microseconds of our CPU per recording for its two requests (the best of three passes)."""
    sim = Sim("--recordings", str(recordings), "--no-rate-limit", "--mode", mode)
    try:
        listing = json.loads(sim.get(f"/v1.0/recordings?accesskey={sim.accesskey}&page_size=100"))
        page = [r["id"] for r in listing["result"]]
        ids = page * max(1, recordings // len(page))
        best = float("inf")
        for _ in range(3):
            before = cpu()
            asyncio.run(http_pass(sim, ids, concurrency))
            best = min(best, (cpu() - before) / len(ids) * 1e6)
        return best
    finally:
        sim.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="zip", choices=("zip", "wav"))
    p.add_argument("--rounds", type=int, default=2000)
    p.add_argument("--requests", type=int, default=1200, help="recordings fetched for the HTTP floor")
    args = p.parse_args()

    sim = Simulator(SimConfig(recordings=1, mode=args.mode))
    rec = next(iter(sim.recordings.values()))
    body = sim.body(rec)[0]
    raw = sim.recording_json(rec)
    print(f"body: {len(body)} bytes ({args.mode})")

    def hashes(_: int) -> None:
        d = BodyDigest()
        d.update(body)
        d.sha256.hexdigest()
        d.md5.digest()

    def inflate(_: int) -> None:
        with io.BytesIO(body) as f, zipfile.ZipFile(f) as z:
            for info in z.infolist():
                z.read(info)  # inflates and checks the member's CRC-32, nothing else

    limits = ZipLimits()

    def zip_check(_: int) -> None:
        inspect_zip(io.BytesIO(body), limits)

    root = Path(tempfile.mkdtemp(prefix="floor-", dir=os.environ.get("TMPDIR", "/tmp")))
    store = Store(ArchiveConfig(directory=root))
    server_hashes = {"md5": "x", "crc32c": "y"}  # as the sidecar names them; not checked here
    job = StoreJob(raw["id"], raw, None, None, root, root / "unused", b"", False, len(body), server_hashes)
    digest = BodyDigest()
    digest.update(body)
    members = inspect_zip(io.BytesIO(body), limits) if args.mode == "zip" else []

    def sidecar_indented(_: int) -> None:
        store._sidecar(job, args.mode, digest, members, f"{job.rec_id}.{args.mode}", "archived", "", "", False)

    sidecar = store._sidecar(job, args.mode, digest, members, f"{job.rec_id}.{args.mode}", "archived", "", "", False)
    doc = json.loads(sidecar)

    def sidecar_compact(_: int) -> None:
        json.dumps(doc, sort_keys=True).encode()

    print(f"file create on this filesystem: {quiet_filesystem(root / 'probe'):.0f} µs")
    dirfd = os.open(root, os.O_RDONLY)

    def files(i: int) -> None:
        write_file_atomic(root / f"{i}-{time.monotonic_ns()}.zip", body)
        write_file_atomic(root / f"{i}-{time.monotonic_ns()}.json", sidecar)
        if i % 8 == 7:
            os.fsync(dirfd)

    steps: list[tuple[str, Callable[[int], object], int]] = [
        ("SHA-256 + MD5 + CRC32C of the body", hashes, args.rounds),
    ]
    if args.mode == "zip":
        steps += [
            ("ZIP check (inspect_zip: members inflated, CRC-32, names, limits, WAV)", zip_check, args.rounds),
            ("  of which inflate + CRC-32 alone (zipfile, nothing else)", inflate, args.rounds),
        ]
    steps += [
        ("sidecar (Store._sidecar: its fields, JSON indented as written)", sidecar_indented, args.rounds),
        ("  the same JSON compact, for comparison", sidecar_compact, args.rounds),
        ("two files: temp name, write, fsync, rename; dir fsync per 8", files, min(args.rounds, 500)),
    ]
    total = 0.0
    for name, step, rounds in steps:
        us = per_round(step, rounds)
        counted = not name.startswith("  ")
        total += us if counted else 0
        print(f"{us:8.0f} µs  {name}")
    os.close(dirfd)
    shutil.rmtree(root)
    print(f"{total:8.0f} µs  the checks' floor per recording = {total / 1000:.2f} CPU-s per 1,000")
    http = http_floor(args.requests, args.mode, 16)
    print(f"{http:8.0f} µs  two requests through aiohttp (307 + storage GET), 16 at a time")
    print(f"{total + http:8.0f} µs  both = {(total + http) / 1000:.2f} CPU-s per 1,000 before state and orchestration")


if __name__ == "__main__":
    main()
