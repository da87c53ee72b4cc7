"""A throwaway Ceph cluster with a RADOS Gateway on loopback: a real S3 server for the tests and
the benchmark (Debian's ``ceph-mon``, ``ceph-osd`` and ``radosgw``; ``.ci/run`` installs them).

One monitor, one OSD on ``memstore`` (RAM, about 150 MB), no cephx, pools of size 1, then
``radosgw`` with the beast frontend and one user. It enforces Object Lock (a COMPLIANCE
version cannot be deleted or shortened) and checks ``Content-MD5``; it ignores
``x-amz-checksum-*`` and ``If-None-Match: *`` on versioned buckets.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ACCESS_KEY = "ARCHIVERTESTKEY00001"
SECRET_KEY = "archiver-test-secret-0123456789abcdefghij"
BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RGW:
    """``RGW(workdir).start()`` → ``endpoint``; ``stop_gateway()`` / ``start_gateway()`` take the
    S3 front end away and back (the cluster stays); ``close()`` ends everything."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.conf = workdir / "ceph.conf"
        self.mon_port = _free_port()
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def _write_conf(self) -> None:
        d = self.dir
        self.conf.write_text(f"""[global]
fsid = {uuid.uuid4()}
mon host = v1:127.0.0.1:{self.mon_port}
mon initial members = a
public addr = 127.0.0.1
ms bind msgr2 = false
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd class update on start = false
osd crush update on start = false
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
osd objectstore = memstore
memstore device bytes = 2147483648
osd max object name len = 460
osd max object namespace len = 64
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
pid file = {d}/run/$name.pid
mon data = {d}/mon/$cluster-$id
osd data = {d}/osd/$cluster-$id
keyring = {d}/keyring
log to stderr = false
err to stderr = true
mon cluster log to stderr = false
debug rgw = 0
rgw frontends = beast endpoint=127.0.0.1:{self.port}
rgw dns name = 127.0.0.1
rgw enable usage log = false
rgw thread pool size = 64
""")

    def _run(self, *args: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            out = subprocess.run(
                [*args, "-c", str(self.conf)], capture_output=True, text=True, timeout=timeout, check=False
            )
            if not out.returncode:
                return out.stdout
            # a monitor just started, on a loaded machine, can refuse the first commands so
            if "problem getting command descriptions" not in out.stderr or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(args)} exited {out.returncode}: {out.stderr[-2000:]}")
            time.sleep(0.5)

    def _daemon(self, name: str, *args: str) -> None:
        log = open(self.dir / "log" / f"{name}.stderr", "ab")  # kept open for the process's life
        self._procs[name] = subprocess.Popen(
            [*args, "-f", "-c", str(self.conf)], stdout=log, stderr=log, start_new_session=True
        )

    def start(self, timeout: float = 90) -> RGW:
        try:
            return self._start(timeout)
        except BaseException:
            self.close()
            raise

    def _start(self, timeout: float) -> RGW:
        deadline = time.monotonic() + timeout
        for sub in ("run", "log", "mon/ceph-a", "osd/ceph-0"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self._write_conf()
        monmap = self.dir / "monmap"
        subprocess.run(
            ["monmaptool", "--create", "--addv", "a", f"[v1:127.0.0.1:{self.mon_port}]", "--fsid",
             self._fsid(), str(monmap)], check=True, capture_output=True,
        )
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap))
        self._daemon("mon", "ceph-mon", "-i", "a")
        osd_id = self._run("ceph", "osd", "create", timeout=max(5, deadline - time.monotonic())).strip()
        self._run("ceph-osd", "-i", osd_id, "--mkfs")
        # placed in the CRUSH map here, not by the OSD at start: with no cephx, the OSD's own
        # commands can reach the monitor before its monmap (fsid 0: "wrong fsid"), and it gives up
        self._run("ceph", "osd", "crush", "add", f"osd.{osd_id}", "1.0", "root=default")
        self._daemon("osd", "ceph-osd", "-i", osd_id)
        self._wait(lambda: '"num_up_osds":1' in self._run("ceph", "osd", "stat", "-f", "json").replace(" ", ""),
                   deadline, "the OSD to come up")
        self._run("radosgw-admin", "user", "create", "--uid", "archiver", "--display-name", "archiver",
                  "--access-key", self.access_key, "--secret", self.secret_key, timeout=120)
        self.start_gateway(max(5, deadline - time.monotonic()))
        return self

    def _fsid(self) -> str:
        for line in self.conf.read_text().splitlines():
            if line.startswith("fsid = "):
                return line.split(" = ", 1)[1]
        raise AssertionError("no fsid")

    def start_gateway(self, timeout: float = 60) -> None:
        self._daemon("rgw", "radosgw", "-n", "client.rgw")
        self._wait(self._answers, time.monotonic() + timeout, "the RADOS Gateway to answer")

    def stop_gateway(self) -> None:
        proc = self._procs.pop("rgw", None)
        if proc is not None:
            proc.kill()
            proc.wait(timeout=30)

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint, timeout=2).close()
        except urllib.error.HTTPError:
            return True
        except OSError:
            if self._procs["rgw"].poll() is not None:
                raise RuntimeError(f"radosgw exited: see {self.dir}/log") from None
            return False
        return True

    def _wait(self, ready: object, deadline: float, what: str) -> None:
        while time.monotonic() < deadline:
            if ready():  # type: ignore[operator]
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out waiting for {what} (logs in {self.dir / 'log'})")

    def close(self) -> None:
        for proc in reversed(list(self._procs.values())):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
        self._procs.clear()
