"""Exceptions that decide what happens to a recording or to the process.

Each class maps to one outcome, so the worker pool can act on the type alone:

* ``ConfigError``        -> exit 2 before any work starts.
* ``AuthRefused``        -> the credential (401) or the account (403: frozen, scheduled for
  deletion, no permission) was refused, for every request alike: stop taking work (exit 3 /
  pause), count nothing against any recording.
* ``LocalStorageError``  -> our disk failed (ENOSPC, EACCES), or the bucket is unavailable
  (``DestinationUnavailable``): the recording stays retryable, the process stops (backfill)
  or pauses (service).
* ``RecordingGone``      -> 404: the recording was deleted; state ``skipped``.
* ``RecordingRefused``   -> 400 for this recording (a malformed id); state ``failed``.
* ``InvalidRecording``   -> the server sent data we must not act on; state ``failed``.
* ``NotReady``           -> files not uploaded yet; try later, not an error.
* ``TransientError``     -> network/5xx/429 beyond the per-request retries; retry later.
* ``VerificationError``  -> bytes failed a check; discard and retry (bounded).
"""

from __future__ import annotations


class ArchiverError(Exception):
    """Base class for every error the archiver raises on purpose."""


class ConfigError(ArchiverError):
    """The configuration is invalid; the message names the key."""


class AuthRefused(ArchiverError):
    """The API refused our credential (401, and logging in again did not help) or our account
    (403). ``reason`` is the server's (``ACCOUNT_FROZEN``, ...) or ``HTTP_<status>``."""

    def __init__(self, message: str, reason: str = "", status: int = 401) -> None:
        super().__init__(message)
        self.reason = reason or f"HTTP_{status}"
        self.status = status


class LocalStorageError(ArchiverError):
    """Writing to the archive directory failed (disk full, permissions, ...)."""


class DestinationUnavailable(LocalStorageError):
    """The bucket cannot be written (unreachable, 5xx after retries, credential refused): like a
    full disk, not any recording's fault."""


class StateLocked(ArchiverError):
    """Another process holds the state database."""


class StateUnusable(ArchiverError):
    """The state database cannot be used (corrupt, not a database, read-only, newer schema)."""


class RecordingGone(ArchiverError):
    """The API says the recording does not exist (deleted)."""


class RecordingRefused(ArchiverError):
    """The API refuses this recording (400: a malformed id)."""


class InvalidRecording(ArchiverError):
    """The recording's data is unusable (hostile id, format, member names, ...)."""


class NotReady(ArchiverError):
    """The recording's files are not (all) uploaded yet."""


class TransientError(ArchiverError):
    """A retryable failure that outlived the per-request retries."""


class VerificationError(ArchiverError):
    """Downloaded bytes failed a length, hash or structure check."""
