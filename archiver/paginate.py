"""Walk a listing (``GET /recordings``, ``GET /calls``) page by page, following the opaque
``next_page_token``: both are paged alike, newest first, the token the last item's ``tm_create``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from .errors import InvalidRecording
from .model import Recording, parse_recording, parse_timestamp

log = structlog.get_logger("archiver.paginate")

MAX_PAGE_ITEMS = 1000  # page_size is at most 100: a page ten times that is not a listing
# A walk longer than this is a server that loops: 20 million recordings at 100 per page, far more
# than one customer's account holds (its store takes about 60,000 ten-second calls).
MAX_WALK_PAGES = 200_000


class Lister(Protocol):
    async def list_recordings(self, page_token: str, page_size: int) -> Any: ...


@dataclass
class Page:
    token: str  # the token this page was requested with ("" for the newest page)
    next_token: str  # "" when this is the last page
    items: list[Any] = field(default_factory=list)  # what ``parse_item`` made of each item
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (id or "?", reason)
    raw_count: int = 0

    @property
    def recordings(self) -> list[Recording]:
        """The items of a page of ``GET /recordings``."""
        return self.items


def parse_page(body: Any, token: str, parse_item: Callable[[Any], Any] = parse_recording) -> Page:
    """Validate one listing answer; bad items are rejected one by one, never the whole walk."""
    if not isinstance(body, dict):
        log.error("page_malformed", reason=f"answer is a {type(body).__name__}, not an object")
        return Page(token=token, next_token="")
    next_token = body.get("next_page_token") or ""
    if not isinstance(next_token, str) or len(next_token) > 200:
        log.error("page_token_malformed", token_type=type(next_token).__name__)
        next_token = ""
    items = body.get("result")
    if items is None:
        items = []
    if not isinstance(items, list):
        log.error("page_result_not_a_list", result_type=type(items).__name__)
        # Nothing to store, but the token may still lead on: count it as a non-empty page.
        return Page(token=token, next_token=next_token, raw_count=1)
    if len(items) > MAX_PAGE_ITEMS:
        log.error("page_too_large", items=len(items), limit=MAX_PAGE_ITEMS, hint="the page is skipped")
        return Page(token=token, next_token=next_token, raw_count=1)
    page = Page(token=token, next_token=next_token, raw_count=len(items))
    for item in items:
        try:
            page.items.append(parse_item(item))
        except InvalidRecording as exc:
            raw_id = item.get("id") if isinstance(item, dict) else None
            page.rejected.append((str(raw_id)[:80] if raw_id is not None else "?", str(exc)))
    return page


async def walk_pages(
    client: Lister, page_size: int, start_token: str = "", *,
    fetch: Callable[[str, int], Awaitable[Any]] | None = None, parse_item: Callable[[Any], Any] = parse_recording,
) -> AsyncIterator[Page]:
    """Yield pages newest-first until an empty page, an empty token or a token seen before.

    The caller stores each page (and checkpoints ``page.next_token``) before asking for the
    next one, so an interrupted walk resumes where it stopped. A server that loops is stopped
    with ``InvalidRecording`` (the checkpoint keeps its place): a page that repeats recordings of
    the page before, page tokens that stop going back in time, or more than ``MAX_WALK_PAGES``.
    Memory stays bounded: only the previous page's ids and token are kept. ``fetch`` and
    ``parse_item`` walk another listing (``client.list_calls``, ``calls.parse_call``).
    """
    fetch = fetch or client.list_recordings
    token = start_token
    previous_ids: set[str] = set()
    previous_time = _token_time(token)
    for pages in range(1, MAX_WALK_PAGES + 1):
        body = await fetch(token, page_size)
        page = parse_page(body, token, parse_item)
        ids = {r.id for r in page.items}
        repeated = ids & previous_ids
        if repeated:
            raise InvalidRecording(
                f"the listing loops: the page after token {token[:40]!r} repeats {len(repeated)} item(s) "
                "of the page before; walk stopped"
            )
        yield page
        if page.raw_count == 0:
            log.debug("walk_end", reason="empty page")
            return
        if not page.next_token:
            log.debug("walk_end", reason="no next token")
            return
        if page.next_token == token:
            log.warning("walk_end", reason="token repeated", token=page.next_token[:40])
            return
        next_time = _token_time(page.next_token)
        if previous_time is not None and next_time is not None and next_time >= previous_time:
            raise InvalidRecording(
                f"the listing loops: page tokens stopped going back in time ({token[:40]!r}, then "
                f"{page.next_token[:40]!r}); walk stopped"
            )
        previous_ids, previous_time = ids, next_time or previous_time
        token = page.next_token
        if pages % 1000 == 0:
            log.info("walk_progress", pages=pages)
    raise InvalidRecording(f"the listing goes on past {MAX_WALK_PAGES} pages: a server that loops; walk stopped")


def _token_time(token: str) -> Any:
    """The time a page token stands for (it is the last item's ``tm_create``), if it reads as one."""
    try:
        return parse_timestamp(token) if token else None
    except ValueError:
        return None
