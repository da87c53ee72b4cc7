"""A store helper process: where downloaded bodies are verified and stored (``storepool`` runs them).

The protocol is ours alone, over the helper's stdin and stdout: frames of a header (two 4-byte
big-endian lengths), a pickle and a body. The first frame to a helper is the ``ArchiveConfig``;
then each request is ``(request id, StoreJob)`` with the job's ``tail`` sent as the frame's body
(raw bytes, not inside the pickle: pickling a body copies it twice more), and each answer is
``(request id, Archived or exception)`` with no body. A helper answers the requests it has in
hand together, after one directory fsync per directory, in groups of up to ``GROUP_BYTES`` of
bodies (``_groups``).

A helper ignores SIGINT and SIGTERM (a terminal's Ctrl-C or systemd's stop reach the whole
process group): it exits when the daemon closes its stdin, or dies, so a store it has begun is
finished. It also holds the state database's lock, so a restarted daemon cannot start while a
helper of the old one is still storing.
"""

from __future__ import annotations

import fcntl
import gc
import os
import pickle
import select
import signal
import struct
import sys
import traceback
from dataclasses import replace
from typing import Any

from .config import ArchiveConfig
from .errors import ArchiverError
from .inspect import write_all
from .layout import set_temp_tag
from .store import Archived, Staged, Store, StoreJob

PIPE_SIZE = 1 << 20
HEADER = struct.Struct(">II")  # the pickle's length, the body's length
GROUP_BYTES = 8 << 20  # bodies stored and answered together, at most (``_groups``)
# No asyncio or structlog here: each helper costs memory, so it imports little.


def frame(obj: Any, body_length: int = 0) -> bytes:
    """A frame's header and pickle; its body (``body_length`` bytes) is written right after."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload), body_length) + payload


def _read_exactly(fd: int, n: int) -> bytes | None:
    """``n`` bytes from ``fd`` (one read when they have all arrived), or None at end of input."""
    data = os.read(fd, n)
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        if not data:
            return None
        data = os.read(fd, n - got)
        parts.append(data)
        got += len(data)
    return b"".join(parts)


class _Frames:
    """Frames from a file descriptor: blocks for the first, then takes only the ones that have
    begun to arrive. Each part is read at its exact length, so a body is read once, not copied
    out of a buffer."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def _one(self) -> tuple[Any, bytes] | None:
        """The next frame's object (unpickled) and body, or None at end of input."""
        header = _read_exactly(self.fd, HEADER.size)
        if header is None:
            return None
        size, body_length = HEADER.unpack(header)
        payload = _read_exactly(self.fd, size)
        body = _read_exactly(self.fd, body_length) if body_length else b""
        if payload is None or body is None:
            return None  # cut off mid-frame: the daemon is gone
        return pickle.loads(payload), body

    def batch(self) -> list[tuple[Any, bytes]]:
        """At least one frame, or [] at end of input."""
        frames: list[tuple[Any, bytes]] = []
        while (one := self._one()) is not None:
            frames.append(one)
            if not select.select([self.fd], [], [], 0)[0]:
                break
        return frames


def request_frame(request: int, job: StoreJob) -> tuple[bytes, bytes]:
    """A request's frame in two parts, to write one after the other: header and pickle, body."""
    return frame((request, replace(job, tail=b"")), len(job.tail)), job.tail


def _request(obj: Any, body: bytes) -> tuple[int, StoreJob]:
    request, job = obj
    return request, replace(job, tail=body)


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
    cfg: ArchiveConfig = first[0][0]
    set_temp_tag(cfg.temp_tag)
    store = Store(cfg)
    gc.freeze()  # the imports and the config live as long as the helper: no collection walks them
    pending = first[1:]
    while True:
        batch = pending or frames.batch()
        if not batch:
            return
        pending = []
        for requests in _groups([_request(obj, body) for obj, body in batch]):
            results = store.store_batch([job for _, job in requests])
            answer = b"".join(frame((request, _portable(r)))
                              for (request, _), r in zip(requests, results, strict=True))
            try:
                write_all(out, answer)
            except ArchiverError:  # the daemon is gone
                return


def _groups(requests: list[tuple[int, StoreJob]]) -> list[list[tuple[int, StoreJob]]]:
    """The requests in hand, cut into groups of up to ``GROUP_BYTES`` of bodies, each stored
    with one directory fsync and answered before the next begins: a group's answers wait for
    its last store, and a worker waiting on an answer downloads nothing. Small bodies still
    share their fsyncs; a large one (22 MB: about 60 ms of hashing) is answered on its own."""
    groups: list[list[tuple[int, StoreJob]]] = []
    size = 0
    for request in requests:
        n = request[1].body_bytes
        if not groups or size + n > GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(request)
        size += n
    return groups


def _portable(result: Archived | Staged | Exception) -> Archived | Staged | Exception:
    """An error the daemon knows how to handle, or an unexpected one it reports (with our trace)."""
    if isinstance(result, (Archived, Staged, ArchiverError)):
        return result
    traceback.print_exception(result, file=sys.stderr)
    return RuntimeError(f"in the store helper: {type(result).__name__}: {result}")


if __name__ == "__main__":
    main()
