"""``verify --manifest`` on a large archive: the real CLI, as a whole command, against an archive
of N recordings (default 100,000) and its signed manifest, beside ``sha256sum`` of the same
bodies (the same bytes read once and hashed once, by the reference tool).

    python bench/manifest.py                          # 100,000 recordings of 20 kB, 3 runs each
    python bench/manifest.py --recordings 20000 --runs 3 --body-bytes 100000

The archive is built once, directly (not downloaded): each recording a body ``<id>.zip`` and its
sidecar, laid out by day over a year, with segments of ``manifest.MAX_ENTRIES`` entries signed by
a fresh key (``manifest.make_segment``, as the daemon writes them). Then, alternately, the runs:

* ``verify --manifest --public-key`` without a state (the auditor's way);
* ``find <archive> -type f -print0 | xargs -0 -P 2 sha256sum`` (two processes, as ours hashes
  on two threads): the bound of reading and hashing every file once (bodies, sidecars, segments;
  ours hashes the bodies and parses the sidecars and segments).

The page cache is warm for both (the archive fits in memory): the figure is CPU, not the disk.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
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

from archiver.manifest import MAX_ENTRIES, Signer, archived_entry, keygen, make_segment, segment_rel  # noqa: E402


def build(root: Path, n: int, body_bytes: int, signer: Signer) -> None:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    entries: list[dict] = []
    seq, previous = 0, None

    def flush() -> None:
        nonlocal seq, previous, entries
        seq += 1
        data = make_segment(signer, "default", seq, previous, entries, datetime.now(UTC))
        path = root / segment_rel("default", seq, datetime.now(UTC) + timedelta(seconds=seq))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        previous = hashlib.sha256(data).hexdigest()
        entries = []

    filler = os.urandom(body_bytes)
    for i in range(n):
        rec_id = str(uuid.uuid4())
        when = start + timedelta(seconds=i * 315)
        rel = f"{when:%Y/%m/%d}/{rec_id}.zip"
        body = rec_id.encode() + filler[len(rec_id):]
        sha = hashlib.sha256(body).hexdigest()
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        path.with_suffix(".json").write_text(json.dumps({"archive": {"sha256": sha, "size": len(body)}}))
        row = {"id": rec_id, "state": "archived", "path": rel, "sha256": sha, "size": len(body),
               "archived_at": when.timestamp()}
        entries.append(archived_entry("default", row, [], rel[:-4] + ".json"))
        if len(entries) == MAX_ENTRIES:
            flush()
    if entries:
        flush()


def timed(command: list[str] | str, shell: bool = False) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, shell=shell, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{command} failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recordings", type=int, default=100_000)
    p.add_argument("--body-bytes", type=int, default=20_000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-manifest-") as tmp:
        work = Path(tmp)
        keygen(work / "k")
        root = work / "archive"
        t0 = time.perf_counter()
        build(root, args.recordings, args.body_bytes, Signer.load(work / "k"))
        print(f"built {args.recordings} recordings of {args.body_bytes} B in {time.perf_counter() - t0:.1f} s")
        cfg = work / "config.toml"
        cfg.write_text(f'[api]\naccesskey = "x"\n[archive]\ndirectory = "{root}"\n'
                       f'[state]\ndatabase = "{work / "no-state.sqlite3"}"\n')
        ours_cmd = [sys.executable, "-m", "archiver", "--config", str(cfg), "--log-level", "error",
                    "verify", "--manifest", "--public-key", str(work / "k.pub")]
        ref_cmd = f"find {root} -type f -print0 | xargs -0 -P 2 -n 2000 sha256sum > /dev/null"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        os.environ.clear()
        os.environ.update(env, PYTHONPATH=str(REPO))
        timed(ref_cmd, shell=True)  # warm the page cache
        ours, ref = [], []
        for _ in range(args.runs):
            ours.append(timed(ours_cmd))
            ref.append(timed(ref_cmd, shell=True))
        mo, mr = statistics.median(ours), statistics.median(ref)
        total = args.recordings * args.body_bytes / 1e6
        print(f"verify --manifest: min {min(ours):.2f} s, median {mo:.2f} s ({total / mo:.0f} MB/s of bodies)")
        print(f"sha256sum -P 2 (every file): min {min(ref):.2f} s, median {mr:.2f} s ({total / mr:.0f} MB/s)")
        print(f"ours / sha256sum: {mo / mr:.2f} (medians), {min(ours) / min(ref):.2f} (minimums)")


if __name__ == "__main__":
    main()
