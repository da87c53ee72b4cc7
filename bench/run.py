"""Benchmarks: voipbin-archiver against the bundled simulator, and against aria2c.

    python bench/run.py                      # all runs, default sizes
    python bench/run.py --runs throughput    # throughput, rate, scale, s3, listing, encryption (comma-separated)
    python bench/run.py --repeat 5           # throughput: 5 alternating runs of each tool, medians
    python bench/run.py --runs throughput --longer 3   # and at 3 x the recordings: what the extra cost

Every figure is a ratio measured in one run on the same machine (ours vs aria2c, ours vs the
theoretical bound), because the machines are shared and noisy. Results are appended to
bench/results.md. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results.md"


def env() -> dict[str, str]:
    """The environment of a measured run: an installed daemon's, whose bytecode is cached (pip
    compiles it on install), so a machine that sets PYTHONDONTWRITEBYTECODE (this one does)
    does not charge every run for recompiling our modules (0.13 s of a 0.5 s start, measured)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("VOIPBIN_") and k != "PYTHONDONTWRITEBYTECODE"}
    e["PYTHONPATH"] = str(REPO)
    return e


class Sim:
    """The simulator in its own process, so its CPU is not charged to us."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "archiver.simulator", "--port", "0", "--precompute", *args],
            stdout=subprocess.PIPE, text=True, env=env(),
        )
        line = self.proc.stdout.readline()  # "simulator: <url> accesskey=<key>"
        if not line.startswith("simulator:"):
            raise RuntimeError(f"simulator did not start: {line!r}")
        _, self.base_url, key = line.split()
        self.accesskey = key.split("=", 1)[1]
        self.origin = self.base_url.rsplit("/v1.0", 1)[0]

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.origin + path, timeout=60) as resp:
            return resp.read()

    def stats(self) -> dict[str, int]:
        return json.loads(self.get("/_sim/stats"))

    def cpu(self) -> float:
        """The simulator's CPU seconds so far (user + system)."""
        return process_cpu(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def checks_cpu(sim: Sim, rounds: int = 5) -> float:
    """CPU seconds our checks of one of the simulator's bodies take at the least, in this
    process with nothing around them: the digest the store helper computes (SHA-256, and MD5
    and CRC32C for the ``x-goog-hash`` storage sends) and the ZIP check (every member's CRC-32,
    size and WAV structure). Best of ``rounds``: the floor, not the noise."""
    sys.path.insert(0, str(REPO))
    from archiver.inspect import BodyDigest, ZipLimits, body_kind, inspect_zip

    url = sim.get("/_sim/urls").split()[0].decode()
    with urllib.request.urlopen(url, timeout=60) as resp:
        body = resp.read()
    # A store helper has freed a large buffer by its second body, and glibc then raises its mmap
    # threshold: later reads of 256 kB come from its heap, not from pages mapped and faulted in
    # afresh each time (the member check of a 22 MB ZIP: 18 ms before, 5 ms after). This process
    # frees one too before it measures, or the first call here measures the faults (70 ms
    # against 48 ms for the whole check; until 2026-12-07 the first throughput row's floor did).
    bytearray(len(body))
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        digest = BodyDigest(md5=True)
        for i in range(0, len(body), 1 << 18):  # as the helper reads it
            digest.update(body[i:i + (1 << 18)])
        if body_kind(body[:4]) == "zip":
            inspect_zip(io.BytesIO(body), ZipLimits())
        best = min(best, time.process_time() - start)
    return best


def startup_floor(rounds: int = 5) -> float:
    """Wall seconds any daemon of ours spends before its first request, at the least: Python
    started and aiohttp imported (which builds its TLS contexts, the system's CA store loaded,
    as any HTTPS client must), nothing of ours. Best of ``rounds``. aria2c starts in 10 ms."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import aiohttp"], check=True, env=env())
        best = min(best, time.perf_counter() - start)
    return best


def measured(cmd: list[str], cwd: Path, stderr_path: Path) -> dict[str, Any]:
    """Run ``cmd``; wall seconds, CPU seconds (its own and its reaped children's: the store
    helpers) and peak memory. A thread samples, twice a second, the RSS of the process and its
    children summed (``rss_samples``: (seconds, MB), to show whether it grows) and their PSS
    summed (``pss_mb``: the peak; shared pages such as libpython's count once, not once per
    process). ``rss_mb`` is the larger of the highest RSS sample and the process's own peak. The
    wait itself blocks in ``wait4``, so the wall time is not rounded to the sampling."""
    samples: list[tuple[float, float]] = []
    pss: list[float] = [0.0]
    done = threading.Event()

    def sample(pid: int, start: float) -> None:
        while not done.wait(0.5):
            pids = [pid, *_children(pid)]
            rss = [_kb(p, "status", "VmRSS:") for p in pids]
            if rss[0] is not None:
                samples.append((time.perf_counter() - start, sum(r or 0 for r in rss) / 1024))
                pss[0] = max(pss[0], sum(_kb(p, "smaps_rollup", "Pss:") or 0 for p in pids) / 1024)

    with open(stderr_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, env=env())
        sampler = threading.Thread(target=sample, args=(proc.pid, start), daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "sys": usage.ru_stime,
            "rss_mb": max([usage.ru_maxrss / 1024] + [mb for _, mb in samples]), "pss_mb": pss[0],
            "rc": proc.returncode, "rss_samples": samples}


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _kb(pid: int, name: str, field: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/<name>, or None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_by_quarter(run: dict[str, Any]) -> str:
    """The highest RSS sampled in each quarter of a run's wall time, e.g. ``44/47/47/47 MB``:
    flat after the first quarter means nothing grows with the recordings done."""
    quarters: list[float | None] = [None] * 4
    for at, mb in run["rss_samples"]:
        q = min(3, int(4 * at / run["wall"]))
        quarters[q] = max(quarters[q] or 0.0, mb)
    return "/".join("-" if mb is None else f"{mb:.0f}" for mb in quarters) + " MB"  # "-": a run too short


def write_config(directory: Path, sim: Sim, concurrency: int, rps: float, s3: dict[str, str] | None = None,
                 state_url: str = "", api: str = "burst = 16\n", **workers: float) -> Path:
    cfg = directory / "config.toml"
    extra = "".join(f"{k} = {v}\n" for k, v in workers.items())
    archive = '[archive]\ndirectory = "archive"\n'
    if s3 is not None:
        keys = "".join(f"{k} = {json.dumps(v)}\n" for k, v in s3.items())
        archive = f'[archive]\ndestination = "s3"\n[archive.s3]\n{keys}'
    cfg.write_text(
        f'[api]\nbase_url = "{sim.base_url}"\naccesskey = "{sim.accesskey}"\nrequests_per_second = {rps}\n'
        f'{api}{archive}[state]\ndatabase = "state.sqlite3"\n'
        + (f"url = {json.dumps(state_url)}\n" if state_url else "")
        + f"[workers]\nconcurrency = {concurrency}\n{extra}[logging]\nlevel = \"warning\"\n"
    )
    cfg.chmod(0o600)
    return cfg


def backfill(sim: Sim, work: Path, concurrency: int, rps: float, s3: dict[str, str] | None = None,
             api: str = "burst = 16\n", archive: str = "") -> dict[str, Any]:
    cfg = write_config(work, sim, concurrency, rps, s3, api=api)
    if archive:  # extra [archive] keys (encrypt_to, signing_key_file)
        cfg.write_text(cfg.read_text().replace("[archive]\n", f"[archive]\n{archive}", 1))
    before = sim.stats()
    result = measured([sys.executable, "-m", "archiver", "--config", str(cfg), "backfill", "--wait", "0"],
                      work, work / "backfill.log")
    after = sim.stats()
    result["api_requests"] = after.get("api_requests", 0) - before.get("api_requests", 0)
    result["storage_requests"] = after.get("storage_requests", 0) - before.get("storage_requests", 0)
    result["http_429"] = after.get("http_429", 0) - before.get("http_429", 0)
    if result["rc"] != 0:
        raise RuntimeError(f"backfill failed rc={result['rc']}: {(work / 'backfill.log').read_text()[-2000:]}")
    con = sqlite3.connect(work / "state.sqlite3")
    stored, result["bytes"] = con.execute(
        "SELECT count(*), sum(size) FROM recordings WHERE state = 'archived'").fetchone()
    con.close()
    expected = len(sim.get("/_sim/urls").splitlines())
    if stored != expected:  # a fast run that left recordings behind would be no figure at all
        raise RuntimeError(f"backfill archived {stored} of {expected} recordings")
    return result


def aria2c(sim: Sim, work: Path, concurrency: int, files: bool = False) -> dict[str, Any]:
    """aria2c fetching what we fetch: every recording's ZIP, or (``files``) its channel files."""
    urls = work / "urls.txt"
    urls.write_bytes(sim.get("/_sim/urls" + ("?files=1" if files else "")))
    out = work / "aria2c"
    out.mkdir()
    cmd = ["aria2c", "-i", str(urls), "-j", str(concurrency), "-d", str(out), "--allow-overwrite=true",
           "--auto-file-renaming=false", "--file-allocation=none", "--console-log-level=error",
           "--summary-interval=0", "--max-connection-per-server=1", "--split=1", "--disable-ipv6", "-q"]
    result = measured(cmd, work, work / "aria2c.log")
    if result["rc"] != 0:
        raise RuntimeError(f"aria2c failed: {(work / 'aria2c.log').read_text()[-2000:]}")
    result["files"] = len(list(out.iterdir()))
    return result


RECYCLE_BYTES = 1_000_000  # bodies this large: each run's files are deleted once it is measured


def recycle(work: Path, audio_bytes: int) -> None:
    """Delete a measured run's files when its bodies are large (``RECYCLE_BYTES``), so the next
    run's page cache reuses their memory. Fresh memory costs this virtual machine a fault to the
    host per page: kept, the 528 MB a large-body run writes made each later run slower, inside
    the copy into the page cache (``copy_folio_from_iter_atomic``, 28-42 % of a run's samples
    in ``perf``), aria2c's more than ours (1.05 s to 1.9-2.1 s; ours 1.8 s to 2.9-3.2 s,
    2026-12-07). Small bodies are kept until the end: a run of them is a thousand files, and
    creating files soon after deleting that many is slow (``quiet_filesystem``)."""
    if audio_bytes >= RECYCLE_BYTES:
        shutil.rmtree(work)


def throughput(args: argparse.Namespace, mode: str, root: Path, listing: bool = False) -> list[str]:
    """Ours and aria2c, alternating, ``--repeat`` times each against one simulator; medians.
    Every run writes into a fresh directory under ``root``, deleted after it only when its
    bodies are large (``recycle``). ``listing``: we fetch from the storage listing, and aria2c
    the same channel files. With ``--longer K``, the same again with K times the recordings,
    and a row for what the extra recordings cost each tool (``marginal``)."""
    short = _throughput_runs(args, mode, root, listing, args.recordings)
    lines = [_throughput_row(args, mode, listing, args.recordings, *short)]
    if args.longer > 1:
        n_long = args.recordings * args.longer
        long = _throughput_runs(args, mode, root, listing, n_long)
        lines.append(_throughput_row(args, mode, listing, n_long, *long))
        lines.append(marginal(mode, listing, args.recordings, short[:2], n_long, long[:2]))
    return lines


def _throughput_runs(args: argparse.Namespace, mode: str, root: Path, listing: bool,
                     n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float, float, float]:
    """(our runs, aria2c's, our checks of one body in CPU-s, the start-up floor, µs a file create)."""
    api = f"burst = 16\nstorage_listing = {'true' if listing else 'false'}\n"
    c = args.concurrency
    tag = f"{mode}-{listing}-{n}-{len(list(root.iterdir()))}"  # unique: a bench may run one N twice
    create_us = quiet_filesystem(root / f"probe-{tag}")
    sim = Sim("--recordings", str(n), "--latency", str(args.latency), "--no-rate-limit", "--mode", mode,
              "--audio-bytes", str(args.audio_bytes))
    ours_runs: list[dict[str, Any]] = []
    ref_runs: list[dict[str, Any]] = []
    try:
        # pair -1 warms up and is not counted: the first runs after a simulator has taken its
        # memory (1.6 GB for 72 large bodies) were the slowest of their set (7.5 s against 4.3-4.6)
        for i in range(-1 if args.audio_bytes >= RECYCLE_BYTES else 0, args.repeat):
            work = root / f"{tag}-ours-{i}"
            work.mkdir()
            ours = backfill(sim, work, c, 0, api=api)
            recycle(work, args.audio_bytes)
            work = root / f"{tag}-aria2c-{i}"
            work.mkdir()
            sim_before = sim.cpu()
            ref = aria2c(sim, work, c, files=listing)
            ref["sim_cpu"] = sim.cpu() - sim_before
            recycle(work, args.audio_bytes)
            if i >= 0:
                ours_runs.append(ours)
                ref_runs.append(ref)
        checks = checks_cpu(sim)
        start = startup_floor()
    finally:
        sim.stop()
    return ours_runs, ref_runs, checks, start, create_us


def marginal(mode: str, listing: bool, n: int, short: tuple[list[dict[str, Any]], list[dict[str, Any]]],
             n_long: int, long: tuple[list[dict[str, Any]], list[dict[str, Any]]]) -> str:
    """What the ``n_long - n`` extra recordings cost each tool in wall time (the difference of
    the median runs of the two sets, ``median_run`` as in their rows), their ratio, and each
    tool's time with no recordings at all (the line through both points, at 0): its start-up
    and wind-down."""
    walls = [[median_run(runs)["wall"] for runs in pair] for pair in (short, long)]
    (ours_n, ref_n), (ours_l, ref_l) = walls
    d_ours, d_ref = ours_l - ours_n, ref_l - ref_n
    at_zero = [w_n - n * (w_l - w_n) / (n_long - n) for w_n, w_l in ((ours_n, ours_l), (ref_n, ref_l))]
    path = "storage listing" if listing else "/recordingfiles"
    return (f"| throughput ({mode}, {path}), marginal | the {n_long - n} recordings between N={n} and N={n_long}"
            f" (medians of this row's two runs) | ours +{d_ours:.2f} s, aria2c +{d_ref:.2f} s |"
            f" | | | | marginal ours/aria2c = **{d_ours / d_ref:.2f}**; at N={n} {ours_n / ref_n:.2f},"
            f" at N={n_long} **{ours_l / ref_l:.2f}**; at N=0 (start-up and wind-down) ours {at_zero[0]:.2f} s,"
            f" aria2c {at_zero[1]:.2f} s |")


def _throughput_row(args: argparse.Namespace, mode: str, listing: bool, n: int, ours_runs: list[dict[str, Any]],
                    ref_runs: list[dict[str, Any]], checks: float, start: float, create_us: float) -> str:
    path = "storage listing" if listing else "/recordingfiles"
    lat, c = args.latency, args.concurrency
    ours = median_run(ours_runs)
    ref = median_run(ref_runs)
    per_rec = (ours["api_requests"] + ours["storage_requests"]) / n
    bound = n * per_rec * lat / c
    mb = ours["bytes"] / 1e6
    # the least wall time of any tool that does aria2c's work and our checks, on this machine's
    # cores, with the simulator's CPU too: every core busy with nothing else from start to end
    cores = os.cpu_count() or 1
    floor = statistics.median((r["cpu"] + r["sim_cpu"] + n * checks) / cores for r in ref_runs)
    walls = ", ".join(f"{r['wall']:.2f}" for r in ours_runs)
    ref_walls = ", ".join(f"{r['wall']:.2f}" for r in ref_runs)
    return (
        f"| throughput ({mode}, {path}) | N={n} of {mb / n:.1f} MB, L={lat * 1000:.0f}ms C={c},"
        f" median of {args.repeat} ({walls} s) |"
        f" {ours['wall']:.2f} s | {n / ours['wall']:.0f} rec/s, {mb / ours['wall']:.1f} MB/s |"
        f" {1000 * ours['cpu'] / n:.2f} CPU-s/1k rec ({ours['sys'] / ours['cpu']:.0%} kernel) |"
        f" {ours['rss_mb']:.0f} MB (PSS {ours['pss_mb']:.0f}) | {per_rec:.3f} req/rec |"
        f" aria2c {ref['wall']:.2f} s ({ref_walls} s;"
        f" {ref['files']} files): ours/aria2c = **{ours['wall'] / ref['wall']:.2f}**; latency bound {bound:.2f} s:"
        f" bound/ours = **{bound / ours['wall']:.0%}**; CPU floor {floor:.2f} s (aria2c's CPU, the simulator's"
        f" and our checks, {1000 * checks:.1f} ms a ZIP, on {cores} cores):"
        f" floor/aria2c = **{floor / ref['wall']:.2f}**, ours/floor = **{ours['wall'] / floor:.2f}**;"
        f" with Python's and aiohttp's start ({start:.2f} s) before it: (start + floor)/aria2c ="
        f" **{(start + floor) / ref['wall']:.2f}**;"
        f" file create {create_us:.0f} µs |"
    )


def encryption(args: argparse.Namespace, root: Path) -> list[str]:
    """The same recordings archived plain and encrypted to an age key (``encrypt_to``),
    alternating, ``--repeat`` times each against one simulator: CPU per 1,000 recordings of each
    (daemon and store helpers), wall time, medians."""
    import pyrage

    n, lat, c = args.recordings, args.latency, args.concurrency
    recipient = str(pyrage.x25519.Identity.generate().to_public())
    sim = Sim("--recordings", str(n), "--latency", str(lat), "--no-rate-limit", "--mode", "zip",
              "--audio-bytes", str(args.audio_bytes))
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "encrypted": []}
    api = "burst = 16\nstorage_listing = false\n"
    try:
        for i in range(args.repeat):
            for kind, extra in (("plain", ""), ("encrypted", f"encrypt_to = [{json.dumps(recipient)}]\n")):
                work = root / f"encryption-{kind}-{i}"
                work.mkdir()
                runs[kind].append(backfill(sim, work, c, 0, api=api, archive=extra))
    finally:
        sim.stop()
    plain, enc = median_run(runs["plain"]), median_run(runs["encrypted"])
    mb = plain["bytes"] / 1e6
    return [
        f"| encryption at rest | N={n} of {mb / n:.2f} MB, L={lat * 1000:.0f}ms C={c}, median of {args.repeat} |"
        f" {enc['wall']:.2f} s (plain {plain['wall']:.2f} s) | {n / enc['wall']:.0f} rec/s |"
        f" encrypted **{1000 * enc['cpu'] / n:.2f}** CPU-s/1k rec, plain **{1000 * plain['cpu'] / n:.2f}** |"
        f" {enc['rss_mb']:.0f} MB | - | encrypted/plain: CPU **{enc['cpu'] / plain['cpu']:.2f}**,"
        f" wall {enc['wall'] / plain['wall']:.2f} |"
    ]


def quiet_filesystem(probe: Path, limit_us: float = 60.0, patience: float = 420.0) -> float:
    """Wait until creating a file in ``probe``'s filesystem is cheap again; the cost in µs.

    On an ext4 without a journal (the development machine's root), an inode freed less than
    60 s ago (360 s while its inode table block is dirty) is skipped when a new one is
    allocated, so creating files soon after deleting thousands (the test suite, an earlier
    benchmark) costs a scan of the freed ones per file: 200-330 µs a create instead of about
    20 µs (``recently_deleted`` in ``perf``). Measured: a backfill right after deleting 6,000
    files took 10.3 s against 8.4 s. Quiet, the probe measures 20-51 µs.
    Nothing here deletes a file until every run is done, for the same reason."""
    probe.mkdir()
    deadline = time.monotonic() + patience
    for attempt in range(1000):
        batch = probe / str(attempt)
        batch.mkdir()
        start = time.perf_counter()
        for i in range(200):
            os.close(os.open(batch / str(i), os.O_CREAT | os.O_WRONLY, 0o600))
        cost = (time.perf_counter() - start) / 200 * 1e6
        if cost <= limit_us or time.monotonic() > deadline:
            break
        if attempt == 0:
            print(f"creating a file costs {cost:.0f} µs (files were deleted recently?); waiting up to"
                  f" {patience:.0f} s for it to drop under {limit_us:.0f} µs", file=sys.stderr, flush=True)
        time.sleep(15)
    return cost


def s3_vs_directory(args: argparse.Namespace, root: Path) -> list[str]:
    """The throughput workload (ZIP) to a local directory and to a COMPLIANCE bucket on a Ceph
    RGW on this machine, alternating, ``--repeat`` times each, one simulator; medians. RGW's own
    CPU is not ours (it is a separate process), but it shares the machine's two cores."""
    sys.path.insert(0, str(REPO))
    import botocore.session
    from botocore.config import Config as BotoConfig

    from tests.rgw import RGW

    n, lat, c = args.recordings, args.latency, args.concurrency
    (root / "rgw").mkdir()
    rgw = RGW(root / "rgw").start()
    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=rgw.endpoint, region_name="us-east-1", aws_access_key_id=rgw.access_key,
        aws_secret_access_key=rgw.secret_key,
        config=BotoConfig(s3={"addressing_style": "path"}, max_pool_connections=64))
    sim = Sim("--recordings", str(n), "--latency", str(lat), "--no-rate-limit", "--mode", "zip")
    dir_runs: list[dict[str, Any]] = []
    s3_runs: list[dict[str, Any]] = []
    try:
        gateway_rate, gateway_cpu = _gateway_rate(client, c, rgw)
        gateway_busy = gateway_rate * gateway_cpu  # cores the client and gateway kept busy
        for i in range(args.repeat):
            work = root / f"s3-dir-{i}"
            work.mkdir()
            sim_before = sim.cpu()
            dir_runs.append(backfill(sim, work, c, 0))
            dir_runs[-1]["sim_cpu"] = sim.cpu() - sim_before
            bucket = f"bench-{i}"
            client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
            work = root / f"s3-s3-{i}"
            work.mkdir()
            ceph_before, sim_before = _ceph_cpu(rgw), sim.cpu()
            s3_runs.append(backfill(sim, work, c, 0, s3={
                "endpoint": rgw.endpoint, "bucket": bucket, "prefix": "voipbin/", "access_key_id": rgw.access_key,
                "secret_access_key": rgw.secret_key, "object_lock_mode": "COMPLIANCE", "retain_days": 1}))
            s3_runs[-1]["ceph_cpu"] = _ceph_cpu(rgw) - ceph_before
            s3_runs[-1]["sim_cpu"] = sim.cpu() - sim_before
    finally:
        sim.stop()
        rgw.close()
    d, o = median_run(dir_runs), median_run(s3_runs)
    # the least wall time of the S3 run on this machine's cores: what the directory run costs us
    # and the simulator, plus what a recording's requests cost a plain client and the gateway
    cores = os.cpu_count() or 1
    floor = statistics.median((r["cpu"] + r["sim_cpu"] + n * gateway_cpu) / cores for r in dir_runs)
    bound = max(n / gateway_rate, floor)
    # the gateway alone keeps fewer than all cores busy: the floor at the bound's own core use
    busy_floor = floor * cores / gateway_busy
    ours_busy = (o["cpu"] + o["ceph_cpu"] + o["sim_cpu"]) / o["wall"]
    walls = ", ".join(f"{r['wall']:.2f}" for r in s3_runs)
    dir_walls = ", ".join(f"{r['wall']:.2f}" for r in dir_runs)
    return [
        f"| s3 (zip, COMPLIANCE, Ceph RGW 16 memstore) | N={n} L={lat * 1000:.0f}ms C={c}, median of {args.repeat}"
        f" ({walls} s) | {o['wall']:.2f} s | {n / o['wall']:.0f} rec/s |"
        f" {1000 * o['cpu'] / n:.2f} CPU-s/1k rec (directory {1000 * d['cpu'] / n:.2f}; the gateway and OSD"
        f" {1000 * o['ceph_cpu'] / n:.2f} more) |"
        f" **{o['rss_mb']:.0f} MB** (PSS {o['pss_mb']:.0f}; directory {d['rss_mb']:.0f}) |"
        f" {(o['api_requests'] + o['storage_requests']) / n:.3f} req/rec (VoIPbin side) |"
        f" directory {d['wall']:.2f} s ({dir_walls} s): s3/directory = **{o['wall'] / d['wall']:.2f}** wall,"
        f" {o['cpu'] / d['cpu']:.2f} CPU; the gateway's bound {n / gateway_rate:.2f} s ({gateway_rate:.0f} rec/s:"
        f" {c} threads of a plain client, a recording's PUT, sidecar PUT and HEAD each):"
        f" bound/ours = **{n / gateway_rate / o['wall']:.0%}**; CPU floor {floor:.2f} s (the directory run's CPU"
        f" and the simulator's, and the client's and gateway's {1000 * gateway_cpu:.1f} ms a recording in the"
        f" bound, on {cores} cores): floor/gateway bound = **{floor * gateway_rate / n:.2f}**,"
        f" max(bound, floor)/ours = **{bound / o['wall']:.0%}**; cores busy: {gateway_busy:.2f} in the bound,"
        f" {ours_busy:.2f} in ours (ours, the gateway's and the simulator's CPU / wall); the floor at the"
        f" bound's {gateway_busy:.2f} cores {busy_floor:.2f} s: it/ours = **{busy_floor / o['wall']:.0%}** |"
    ]


def _gateway_rate(client: Any, threads: int, rgw: Any, rounds: int = 300,
                  size: int = 171_000) -> tuple[float, float]:
    """Recordings per second the gateway takes from a plain threaded botocore client: each a
    locked PUT of ``size`` bytes with Content-MD5, a locked PUT of a 2 kB sidecar and a HEAD,
    what our destination sends per recording. On this machine it is the bound of the S3 run.
    Also the CPU seconds a recording cost the client (this process) and the gateway and OSD."""
    import base64
    import hashlib
    from concurrent.futures import ThreadPoolExecutor
    from datetime import UTC, datetime, timedelta

    bucket = "bench-bound"
    client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    body, side = os.urandom(size), os.urandom(2000)
    lock = {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": datetime.now(UTC) + timedelta(days=1)}

    def one(i: int) -> None:
        for key, data in ((f"r/{i}.zip", body), (f"r/{i}.json", side)):
            md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
            client.put_object(Bucket=bucket, Key=key, Body=data, ContentMD5=md5, **lock)
        client.head_object(Bucket=bucket, Key=f"r/{i}.zip")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(threads)))  # warm: connections, the bucket index
        start, cpu_start, ceph_start = time.perf_counter(), time.process_time(), _ceph_cpu(rgw)
        list(pool.map(one, range(threads, threads + rounds)))
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu_start + _ceph_cpu(rgw) - ceph_start
    return rounds / wall, cpu / rounds


def _ceph_cpu(rgw: Any) -> float:
    """CPU seconds used so far by the gateway and the OSD (they share our two cores)."""
    return sum(process_cpu(rgw._procs[name].pid) for name in ("rgw", "osd"))


def process_cpu(pid: int, children: bool = False, reaped: bool = False) -> float:
    """CPU seconds a live process has used (0 once it is gone), with ``reaped`` the children it
    has waited for, with ``children`` its live children's too."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    ticks = fields[11:15] if reaped else fields[11:13]  # utime, stime (then cutime, cstime)
    total = sum(int(t) for t in ticks) / os.sysconf("SC_CLK_TCK")
    if children:
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            kids = []
        total += sum(process_cpu(int(kid)) for kid in kids)
    return total


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median wall time (the upper median for an even count)."""
    return sorted(runs, key=lambda r: r["wall"])[len(runs) // 2]


def rate_limited(args: argparse.Namespace, root: Path) -> list[str]:
    n, lat, c = args.rate_recordings, args.latency, args.concurrency
    sim = Sim("--recordings", str(n), "--latency", str(lat))
    try:
        work = root / "rate"
        work.mkdir()
        ours = backfill(sim, work, c, 16)
    finally:
        sim.stop()
    bound = ours["api_requests"] / 16.7
    share = ours["http_429"] / max(1, ours["api_requests"])
    return [
        f"| rate-limited (16.7/s, burst 33) | N={n} L={lat * 1000:.0f}ms C={c} rps=16 | {ours['wall']:.2f} s |"
        f" {n / ours['wall']:.1f} rec/s | {1000 * ours['cpu'] / n:.2f} CPU-s/1k rec |"
        f" {ours['rss_mb']:.0f} MB (PSS {ours['pss_mb']:.0f}) |"
        f" {ours['api_requests']} API req | rate bound {bound:.2f} s: bound/ours = **{bound / ours['wall']:.0%}**;"
        f" 429s: {ours['http_429']} ({share:.2%}) |"
    ]


def listing(args: argparse.Namespace, root: Path) -> list[str]:
    """The two fetch paths side by side in one run, at the default pace (8 requests/s, burst 8):
    600 recent recordings through the storage listing and through /recordingfiles, then a mixed
    archive (half older than the listed URLs' 7 days) through the listing with its fallback."""
    n, lat, c = args.listing_recordings, args.latency, 8
    bound = n / 8.0  # the per-recording path's rate bound: one request per recording at 8/s
    rows = []
    for name, spacing, listed in (("recent, storage listing", 97.0, True), ("recent, /recordingfiles", 97.0, False),
                                  ("half older than 7 days, listing + fallback", 14 * 86400 / n, True)):
        sim = Sim("--recordings", str(n), "--latency", str(lat), "--spacing", str(spacing))
        try:
            work = root / f"listing-{len(rows)}"
            work.mkdir()
            api = f"storage_listing = {'true' if listed else 'false'}\n"
            ours = backfill(sim, work, c, 8, api=api)
        finally:
            sim.stop()
        rows.append(
            f"| {name} | N={n} L={lat * 1000:.0f}ms C={c} rps=8 burst=8 | {ours['wall']:.2f} s |"
            f" {n / ours['wall']:.1f} rec/s | {1000 * ours['cpu'] / n:.2f} CPU-s/1k rec |"
            f" {ours['rss_mb']:.0f} MB (PSS {ours['pss_mb']:.0f}) |"
            f" {ours['api_requests']} API req = **{ours['api_requests'] / n:.3f}/rec**, {ours['storage_requests']}"
            f" storage GETs | wall / rate bound ({bound:.0f} s) = **{ours['wall'] / bound:.3f}** |"
        )
    return rows


def noop_cycle(cfg: Path, work: Path) -> dict[str, float]:
    """Start ``run``, wait for the first cycle_done event, stop it; return that event."""
    log = work / "run.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "archiver", "--config", str(cfg), "--log-level", "info",
                                 "--log-format", "json", "run"], cwd=work, stdout=subprocess.DEVNULL,
                                stderr=err, env=env())
        deadline = time.monotonic() + 600
        event = None
        while event is None and time.monotonic() < deadline:
            for line in log.read_text().splitlines():
                if '"cycle_done"' in line:
                    event = json.loads(line)
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    if event is None:
        raise RuntimeError("no cycle_done event")
    return event


def scale(args: argparse.Namespace, root: Path) -> list[str]:
    rows = []
    for n in (args.scale // 10, args.scale):
        sim = Sim("--recordings", str(n), "--audio-bytes", "64", "--no-rate-limit")
        try:
            work = root / f"scale-{n}"
            work.mkdir()
            ours = backfill(sim, work, args.concurrency, 0)
            cfg = write_config(work, sim, args.concurrency, 0, poll_interval=3600)
            status = measured([sys.executable, "-m", "archiver", "--config", str(cfg), "status", "--json"],
                              work, work / "status.log")
            cycle = noop_cycle(cfg, work)
        finally:
            sim.stop()
        rows.append(
            f"| scale | N={n} L=0 C={args.concurrency} tiny | {ours['wall']:.1f} s | {n / ours['wall']:.0f} rec/s |"
            f" {1000 * ours['cpu'] / n:.2f} CPU-s/1k rec | peak RSS **{ours['rss_mb']:.0f} MB** (PSS"
            f" {ours['pss_mb']:.0f} MB; highest RSS per quarter of the run: {rss_by_quarter(ours)}) |"
            f" status {status['wall']:.2f} s (process, incl. start-up) | no-op run cycle:"
            f" {cycle['requests']} req, {1000 * cycle['cpu_seconds']:.1f} ms CPU, {1000 * cycle['seconds']:.0f} ms |"
        )
    return rows


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "0")
    return f"{os.cpu_count()} cores ({cpu}), {int(mem) / 1024**2:.0f} GiB, Python {platform.python_version()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="throughput,rate,scale")
    p.add_argument("--recordings", type=int, default=3000)
    p.add_argument("--latency", type=float, default=0.02)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3, help="throughput runs of each tool (median reported)")
    p.add_argument("--rate-recordings", type=int, default=500)
    p.add_argument("--scale", type=int, default=100_000)
    p.add_argument("--listing-recordings", type=int, default=600)
    p.add_argument("--audio-bytes", type=int, default=169_920, help="throughput: audio bytes per recording")
    p.add_argument("--longer", type=int, default=1,
                   help="throughput: also run K times the recordings, and report what the extra ones cost each tool")
    p.add_argument("--modes", default="zip,wav", help="throughput: the server generations to run (zip, wav)")
    p.add_argument("--fetch", default="recordingfiles,listing",
                   help="throughput: the fetch paths to run (recordingfiles, listing)")
    p.add_argument("--workdir", default=None, help="where temporary archives go (default: system temp)")
    args = p.parse_args()
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    runs = set(args.runs.split(","))
    if "throughput" in runs and not shutil.which("aria2c"):
        sys.exit("aria2c is needed for the reference run: apt-get install aria2")
    lines: list[str] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:  # deleted once, at the very end
        root = Path(tmp)
        if "throughput" in runs:
            for mode in args.modes.split(","):
                for fetch in args.fetch.split(","):
                    if fetch == "listing" and mode == "wav":
                        continue  # the tutorial's server had no storage listing
                    lines += throughput(args, mode, root, listing=fetch == "listing")
        if "rate" in runs:
            lines += rate_limited(args, root)
        if "scale" in runs:
            lines += scale(args, root)
        if "s3" in runs:
            lines += s3_vs_directory(args, root)
        if "listing" in runs:
            lines += listing(args, root)
        if "encryption" in runs:
            lines += encryption(args, root)
    header = (
        f"\n## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC — {machine()}\n\n"
        f"`python bench/run.py {' '.join(sys.argv[1:])}`\n\n"
        "| run | parameters | wall | throughput | CPU (with helpers) | peak RSS (daemon + helpers) | requests"
        " | ratios |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    text = header + "\n".join(lines) + "\n"
    print(text)
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by `bench/run.py`; earlier rows are kept.\n")
    with open(RESULTS, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
