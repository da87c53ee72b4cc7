"""The systemd notify protocol: one datagram per message to ``$NOTIFY_SOCKET``.

Small on purpose (no libsystemd): ``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``.
Without ``NOTIFY_SOCKET`` every call is a no-op, so the same code runs outside systemd.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None) -> None:
        self._sock: socket.socket | None = None
        self._address: str | bytes | None = None
        if address and address[0] in "/@":
            # "@name" is an abstract socket: a leading NUL byte on Linux
            self._address = b"\0" + address[1:].encode() if address[0] == "@" else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_env(cls) -> Notifier:
        return cls(os.environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, message: str) -> None:
        if self._sock is None or self._address is None:
            return
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError:
            pass  # systemd gone or socket full: never let notification break the daemon

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half the timeout), or None when not requested."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.05, int(usec) / 1e6 / 2)
    except ValueError:
        return None
