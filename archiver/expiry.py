"""Access keys expire: learn when ours does (``GET /accesskeys``) and warn well before it.

The server never shows a key again after creating it; its listing shows each key's
``token_prefix`` and ``tm_expire``, so ours is the one whose prefix our key starts with. A key
without the permission to list keys cannot learn its expiry: that is said once, and the
archiver carries on. The expiry is kept in the state database (meta ``accesskey_expires``) for
``status``, metrics and systemd's ``STATUS=``.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import structlog

from .client import ApiClient
from .errors import ArchiverError, AuthRefused
from .logs import redact
from .state import State

log = structlog.get_logger("archiver.expiry")

WARN_BEFORE = 14 * 86400.0  # warn from this long before the key expires
CHECK_EVERY = 86400.0  # the service looks again this often (a key can be renewed or replaced)


def expiry_warning(expires: float | None, now: float | None = None) -> str:
    """"" or the warning for a key that expires within ``WARN_BEFORE`` (or has expired)."""
    if expires is None:
        return ""
    left = expires - (time.time() if now is None else now)
    if left >= WARN_BEFORE:
        return ""
    when = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%d %H:%M UTC")
    if left <= 0:
        return f"access key expired at {when}"
    return f"access key expires in {left / 86400:.1f} days ({when}): create a new one and replace it"


async def watch_accesskey(client: ApiClient, state: State, once: bool) -> None:
    """Learn the key's expiry now and, unless ``once``, every ``CHECK_EVERY``; warn when close."""
    while True:
        try:
            expires = await client.accesskey_expiry()
        except AuthRefused as exc:
            if exc.reason == "PERMISSION_DENIED":
                log.warning("accesskey_expiry_unknown", reason=exc.reason,
                            hint="this key may not list access keys (GET /accesskeys), so its expiry is not watched")
                return  # said once; carry on without it
            log.info("accesskey_expiry_unknown", reason=exc.reason)  # the engine handles the refusal itself
        except ArchiverError as exc:
            log.info("accesskey_expiry_unknown", reason=redact(str(exc)))
        else:
            if expires is None:
                log.warning("accesskey_expiry_unknown", reason="GET /accesskeys does not list this key")
                await state.delete_meta("accesskey_expires")
            else:
                await state.set_meta("accesskey_expires", str(expires))
                warning = expiry_warning(expires)
                if warning:
                    log.warning("accesskey_expires_soon", warning=warning)
                else:
                    log.info("accesskey_expires", at=datetime.fromtimestamp(expires, UTC).isoformat())
        if once:
            return
        await asyncio.sleep(CHECK_EVERY)
