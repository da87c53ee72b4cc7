"""Exceptions that decide what happens to a recording or to the process.

Each class maps to one outcome, so the worker pool can act on the type alone:

* ``ConfigError``        -> exit 2 before any work starts.
* ``AuthRefused``        -> the credential was refused: stop taking work (exit 3 / pause).
* ``LocalStorageError``  -> our disk failed (ENOSPC, EACCES): the recording stays retryable,
  the process stops (backfill) or pauses (service).
* ``RecordingGone``      -> 404: the recording was deleted; state ``skipped``.
* ``RecordingRefused``   -> 403/400 for this recording; state ``failed``.
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
    """The API refused our credential (401) and logging in again did not help."""


class LocalStorageError(ArchiverError):
    """Writing to the archive directory failed (disk full, permissions, ...)."""


class StateLocked(ArchiverError):
    """Another process holds the state database."""


class RecordingGone(ArchiverError):
    """The API says the recording does not exist (deleted)."""


class RecordingRefused(ArchiverError):
    """The API refuses this recording (403 another customer's, 400 malformed id)."""


class InvalidRecording(ArchiverError):
    """The recording's data is unusable (hostile id, format, member names, ...)."""


class NotReady(ArchiverError):
    """The recording's files are not (all) uploaded yet."""


class TransientError(ArchiverError):
    """A retryable failure that outlived the per-request retries."""


class VerificationError(ArchiverError):
    """Downloaded bytes failed a length, hash or structure check."""
