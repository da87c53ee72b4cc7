"""A store helper process: where downloaded bodies are verified and stored (``storepool`` runs them).

The protocol is ours alone, over the helper's stdin and stdout: frames of a 4-byte big-endian
length and a pickle. The first frame to a helper is the ``ArchiveConfig``; then each request is
``(request id, StoreJob)`` and each answer ``(request id, Archived or exception)``. A helper
answers the requests it has in hand together, after one directory fsync per directory.

A helper ignores SIGINT and SIGTERM (a terminal's Ctrl-C or systemd's stop reach the whole
process group): it exits when the daemon closes its stdin, or dies, so a store it has begun is
finished. It also holds the state database's lock, so a restarted daemon cannot start while a
helper of the old one is still storing.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import select
import signal
import sys
import traceback
from typing import Any

from .config import ArchiveConfig
from .errors import ArchiverError
from .inspect import write_all
from .layout import set_temp_tag
from .store import Archived, Staged, Store, StoreJob

PIPE_SIZE = 1 << 20
_NONE = object()  # no whole frame yet
LENGTH = 4  # No asyncio or structlog here: each helper costs memory, so it imports little.


def frame(obj: Any) -> bytes:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return len(payload).to_bytes(LENGTH, "big") + payload


class _Frames:
    """Frames from a file descriptor: blocks for the first, then takes only what has arrived."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()

    def _one(self) -> Any:
        """The next whole frame, unpickled (read in place: no copy of a body), or ``_NONE``."""
        if len(self.buf) < LENGTH:
            return _NONE
        end = LENGTH + int.from_bytes(self.buf[:LENGTH], "big")
        if len(self.buf) < end:
            return _NONE
        with memoryview(self.buf) as view, view[LENGTH:end] as payload:
            obj = pickle.loads(payload)
        del self.buf[:end]
        return obj

    def batch(self) -> list[Any]:
        """At least one frame's object, or [] at end of input."""
        objs: list[Any] = []
        while True:
            while (obj := self._one()) is not _NONE:
                objs.append(obj)
            if objs and not select.select([self.fd], [], [], 0)[0]:
                return objs
            chunk = os.read(self.fd, PIPE_SIZE)
            if not chunk:
                return objs
            self.buf += chunk


def main() -> None:
    """The helper: store what the daemon sends until it closes our stdin."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out = os.dup(1)
    os.dup2(2, 1)  # a stray print must not corrupt the protocol
    try:  # a body of up to 1 MiB in one write and one read, not one per 64 KiB (the default)
        fcntl.fcntl(0, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except (OSError, AttributeError):  # AttributeError: not Linux
        pass  # a smaller pipe works too: the limit is /proc/sys/fs/pipe-max-size
    frames = _Frames(0)
    first = frames.batch()
    if not first:
        return
    cfg: ArchiveConfig = first[0]
    set_temp_tag(cfg.temp_tag)
    store = Store(cfg)
    pending = first[1:]
    while True:
        requests: list[tuple[int, StoreJob]] = pending or frames.batch()
        if not requests:
            return
        pending = []
        results = store.store_batch([job for _, job in requests])
        answer = b"".join(frame((request, _portable(r))) for (request, _), r in zip(requests, results, strict=True))
        try:
            write_all(out, answer)
        except ArchiverError:  # the daemon is gone
            return


def _portable(result: Archived | Staged | Exception) -> Archived | Staged | Exception:
    """An error the daemon knows how to handle, or an unexpected one it reports (with our trace)."""
    if isinstance(result, (Archived, Staged, ArchiverError)):
        return result
    traceback.print_exception(result, file=sys.stderr)
    return RuntimeError(f"in the store helper: {type(result).__name__}: {result}")


if __name__ == "__main__":
    main()
