"""Driving the power-cut filesystem (``tests/powercutfs.py``) from a test: mount, cut, reboot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from ctypes.util import find_library
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

FUSERMOUNT = shutil.which("fusermount3") or shutil.which("fusermount")


def require_fuse() -> None:
    """Skip where FUSE cannot work at all (CI installs fuse3 and has /dev/fuse: it runs them)."""
    if not os.path.exists("/dev/fuse") or FUSERMOUNT is None or not find_library("fuse3"):
        pytest.skip("needs /dev/fuse, fusermount3 and libfuse3 (Debian: fuse3)")


class PowerCutMount:
    """One "boot": ``backing`` served at ``mountpoint`` until a cut or an unmount."""

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        self.backing, self.mountpoint = backing, mountpoint
        self.cut_file = Path(f"{backing}.cut.json")
        self.log = Path(f"{backing}.fs.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def mount(self, timeout: float = 20) -> PowerCutMount:
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.cut_file.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.powercutfs", str(self.backing), str(self.mountpoint)],
                stdout=log, stderr=log, env=env,
            )
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"powercutfs did not mount: {self.log.read_text()[-2000:]}")
            time.sleep(0.02)
        return self

    def command(self, text: str) -> None:
        """One control command (see ``powercutfs``); it has taken effect when this returns."""
        fd = os.open(self.mountpoint / ".powercut", os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    @property
    def was_cut(self) -> bool:
        return self.cut_file.exists()

    def cut_summary(self) -> dict[str, Any]:
        return json.loads(self.cut_file.read_text())

    def unmount(self, timeout: float = 20) -> None:
        """Unmount (lazily if something still holds a file) and wait for the server to exit:
        after a cut ``backing`` holds what survived, otherwise everything (a clean unmount)."""
        if self.proc is None:
            return
        subprocess.run([FUSERMOUNT, "-u", "-z", str(self.mountpoint)], check=False, capture_output=True)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            subprocess.run([FUSERMOUNT, "-u", "-z", str(self.mountpoint)], check=False, capture_output=True)
            raise AssertionError(f"powercutfs did not exit: {self.log.read_text()[-2000:]}") from None
        finally:
            self.proc = None
