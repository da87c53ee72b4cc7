"""Where verified recordings end up: the seam between the engine and the storage it writes to.

The store helpers verify every body the same way whatever the destination. A ``directory``
destination lets them rename the body into place themselves (``store.Store``); any other
destination gets the verified body staged (``store.Staged``) and commits it here, on the event
loop. Each destination also adopts what an interrupted run left behind, re-checks an archived
recording (``verify``, and before the server's copy is deleted) and notes that deletion.
"""

from __future__ import annotations

from ..config import ArchiveConfig
from .base import Destination

__all__ = ["Destination", "open_destination"]


def open_destination(cfg: ArchiveConfig) -> Destination:
    """The configured destination (not opened yet)."""
    if cfg.destination == "s3":
        from .s3 import S3Destination  # only with destination = "s3": its library is an extra

        return S3Destination(cfg)
    from .directory import DirectoryDestination

    return DirectoryDestination(cfg)
