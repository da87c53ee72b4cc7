"""The paginator against the simulator over real HTTP: tokens, empty pages, repeats."""

from __future__ import annotations

import pytest

from archiver.client import ApiClient
from archiver.config import ApiConfig
from archiver.paginate import walk_pages
from tests.conftest import archived_this_run, run_cli, write_config


def _api(sim) -> ApiConfig:
    return ApiConfig(base_url=sim.base_url, accesskey=sim.accesskey, requests_per_second=0, retry_base=0.01)


async def _walk(sim, page_size: int, start: str = ""):
    async with ApiClient(_api(sim)) as client:
        return [page async for page in walk_pages(client, page_size, start)]


async def test_walks_every_page_newest_first_and_stops_after_the_token_on_the_last_page(make_sim):
    sim = await make_sim(recordings=45)
    pages = await _walk(sim, 10)
    # 10+10+10+10+5, then the short last page's token leads to one empty page
    assert [len(p.recordings) for p in pages] == [10, 10, 10, 10, 5, 0]
    assert sim.stats["list"] == 6
    ids = [r.id for p in pages for r in p.recordings]
    assert len(ids) == len(set(ids)) == 45
    created = [r.tm_create for p in pages for r in p.recordings]
    assert created == sorted(created, reverse=True)
    assert pages[1].token == pages[0].next_token  # opaque: passed back exactly as it came


async def test_empty_first_page(make_sim, tmp_path):
    sim = await make_sim(recordings=0)
    pages = await _walk(sim, 10)
    assert len(pages) == 1 and pages[0].recordings == []
    cfg = write_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "1")
    assert result.rc == 0, result
    assert archived_this_run(result.out) == 0


async def test_a_repeating_token_ends_the_walk(make_sim):
    sim = await make_sim(recordings=30)
    sim.quirk = "repeat_token"
    pages = await _walk(sim, 10)
    assert len(pages) == 2, "the walk must stop when the server repeats a token"


async def test_tutorial_tokens_are_passed_back_unchanged(make_sim):
    sim = await make_sim(recordings=25, timestamps="tutorial")
    pages = await _walk(sim, 10)
    assert " " in pages[0].next_token  # "2021-01-28 09:16:58.076735" style
    assert sum(len(p.recordings) for p in pages) == 25


async def test_malformed_items_are_rejected_one_by_one(make_sim, tmp_path):
    sim = await make_sim(recordings=12, audio_bytes=4000)
    sim.extra_listing_items = [
        "not an object",
        {"status": "ended"},  # no id
        {"id": "../../etc/passwd", "status": "ended"},
        {"id": "not-a-uuid", "status": "ended"},
    ]
    pages = await _walk(sim, 10)
    assert len(pages[0].rejected) == 4
    cfg = write_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "2")
    assert result.rc == 0, result
    assert archived_this_run(result.out) == 12
    assert result.err.count("listing_item_rejected") == 4


async def test_backfill_resumes_at_the_checkpointed_page(make_sim, tmp_path):
    """The token is stored with each page: a walk that stopped resumes there."""
    from archiver.state import StateDB

    sim = await make_sim(recordings=50, audio_bytes=4000)
    pages = await _walk(sim, 10)
    db = tmp_path / "state.sqlite3"
    state = await StateDB.open(db)
    first_two = pages[0].recordings + pages[1].recordings
    await state.for_account("default").store_page(first_two, "full", pages[1].next_token)
    await state.close()
    sim.stats.clear()
    cfg = write_config(tmp_path, sim, api={"page_size": 10})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "2")
    assert result.rc == 0, result
    assert sim.stats["list"] == 4, "pages 3..5 and the empty one; the first two are not asked again"
    assert archived_this_run(result.out) == 50


@pytest.mark.parametrize(
    ("quirk", "message"),
    [("endless", "repeats 10 item(s)"), ("rising_token", "stopped going back in time")],
)
async def test_a_listing_that_loops_is_stopped_with_a_clear_error(tmp_path, make_sim, quirk, message):
    sim = await make_sim(recordings=30, audio_bytes=2000)
    sim.quirk = quirk
    cfg = write_config(tmp_path, sim, api={"page_size": 10})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "2")
    assert result.rc == 1, result
    assert "listing failed" in result.out and message in result.out
    assert sim.stats["list"] <= 4, "stopped at once, not after thousands of requests"
    assert archived_this_run(result.out) >= 10, "what was listed before the loop is archived"
