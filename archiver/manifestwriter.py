"""The daemon's side of the manifest (``manifest``): one chain of segments per account.

The state is the queue: a recording stored (``mark_archived``) or whose server copy was deleted
is due in the manifest until a segment lists it (``manifest_seq``, ``manifest_deleted_seq``). A
segment is written to the archive (temporary name, fsync, rename; a locked object in a bucket)
*before* the state records it, in one transaction with the chain's new head. So:

* a crash before a file's rename loses nothing (the file is adopted on the next start, and due);
* a crash after ``mark_archived`` and before the segment: still due, listed by the next one;
* a crash after the segment is durable and before the state records it: the next flush finds a
  segment newer than the state's head, checks its signature, and records what it lists.

A segment newer than the head that is not ours, or a head newer than any segment (the newest
deleted), is logged as an error and exported as ``voipbin_archiver_manifest_ok 0``; archiving
never stops for it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import structlog

from .destinations import Destination
from .layout import beside_rel
from .manifest import (
    DIRECTORY,
    MAX_ENTRIES,
    RECORDING_EVENTS,
    Signer,
    archived_entry,
    hold_entry,
    make_segment,
    open_segment,
    removed_entry,
    segment_rel,
    server_deleted_entry,
    sha256_hex,
)
from .manifestcheck import read_chain, segment_rels
from .state import State
from .state.base import MANIFEST_HEAD

log = structlog.get_logger("archiver.manifest")


class ManifestWriter:
    """Writes ``account``'s segments (``flush``); ``ok`` is False once the chain was found broken."""

    def __init__(self, signer: Signer, state: State, destination: Destination, account: str) -> None:
        self.signer = signer
        self.public = signer.private.public_key()
        self.state = state
        self.destination = destination
        self.account = account
        self.ok = True
        self.problems: list[str] = []
        self.segments_written = 0

    async def check_chain(self) -> bool:
        """Read every segment of the account and check signatures and links (at start); the
        problems are logged and ``ok`` says whether there were none."""
        chain = await read_chain(self.destination, self.account, await self._segments(), self.public)
        head = await self._head()
        if head is not None and (chain.newest is None or chain.newest.seq < head["seq"]):
            chain.problems.append(f"segment {head['seq']} ({head['rel']}) was written but is gone")
        for problem in chain.problems:
            self._broken(problem)
        log.info("manifest_chain_checked", segments=len(chain.segments), ok=not chain.problems,
                 head=chain.newest.rel if chain.newest else None)
        return not chain.problems

    async def flush(self) -> int:
        """Write what is due as segments (none when nothing is); returns how many. Only one
        daemon writes an account's chain at a time (``state.manifest_lock``)."""
        written = 0
        async with self.state.manifest_lock() as mine:
            if not mine:
                return 0
            head = await self._take_up()
            while True:
                due = await self.state.manifest_due(MAX_ENTRIES)
                listed = {r["id"] for r in due.archived}
                deleted = [r for r in due.deleted if r["manifest_seq"] is not None or r["id"] in listed]
                if not (due.archived or deleted or due.removed or due.holds):
                    return written
                head = await self._write(head, due.archived, deleted, due.removed, due.holds)
                written += 1

    async def _write(self, head: dict[str, Any] | None, archived: list[dict[str, Any]],
                     deleted: list[dict[str, Any]], removed: list[dict[str, Any]],
                     holds: list[dict[str, Any]]) -> dict[str, Any]:
        """One segment: what was stored, then server copies deleted, holds, removals (a removal
        after the hold's release that allowed it)."""
        members = await self.destination.unpacked_files(archived) if archived else {}
        entries = [archived_entry(self.account, row, members.get(row["id"], []),
                                  row["path"] if row["state"] == "no_audio" else beside_rel(row["path"], "json"))
                   for row in archived]
        entries += [server_deleted_entry(self.account, row) for row in deleted]
        entries += [hold_entry(self.account, event) for event in holds]
        entries += [removed_entry(self.account, row) for row in removed]
        seq = head["seq"] + 1 if head else 1
        created = datetime.now(UTC)
        data = make_segment(self.signer, self.account, seq, head["sha256"] if head else None, entries, created)
        rel = segment_rel(self.account, seq, created)
        await self.destination.put_file(rel, data)
        new_head = {"seq": seq, "sha256": sha256_hex(data), "rel": rel}
        await self.state.mark_manifested(seq, json.dumps(new_head),
                                         [(r["id"], r["sha256"]) for r in archived + removed],
                                         [r["id"] for r in deleted], [e["seq"] for e in holds])
        self.segments_written += 1
        log.info("manifest_segment_written", segment=rel, entries=len(entries), archived=len(archived),
                 server_copies_deleted=len(deleted), removed=len(removed), holds=len(holds))
        return new_head

    async def _segments(self) -> list[tuple[int, str]]:
        """(seq, path) of each of the account's segments in the archive."""
        rels, _ = segment_rels(await self.destination.list_files(f"{DIRECTORY}/{self.account}"))
        return rels.get(self.account, [])

    async def _head(self) -> dict[str, Any] | None:
        raw = await self.state.get_meta(MANIFEST_HEAD)
        return json.loads(raw) if raw else None

    async def _take_up(self) -> dict[str, Any] | None:
        """The chain's head: the state's, or a newer segment of ours the state has not recorded
        (a crash after its rename), whose entries are then recorded as listed."""
        head = await self._head()
        found = sorted(await self._segments())
        if not found:
            if head is not None:
                self._broken(f"segment {head['seq']} ({head['rel']}) was written but no segment is left")
            return head
        seq, rel = found[-1]
        if head is not None and seq < head["seq"]:
            self._broken(f"segment {head['seq']} ({head['rel']}) was written but the newest left is {rel}")
            return head
        if head is not None and seq == head["seq"]:
            return head
        data = await self.destination.read_bytes(rel)
        doc, why = open_segment(data or b"", self.public)
        if doc is None or why:
            self._broken(f"{rel}: newer than the chain's head and not ours ({why or 'unreadable'})")
            return head
        entries = [e for e in doc["entries"] if isinstance(e, dict)]
        new_head = {"seq": seq, "sha256": sha256_hex(data or b""), "rel": rel}
        await self.state.mark_manifested(
            seq, json.dumps(new_head),
            [(str(e["recording_id"]), e.get("sha256")) for e in entries if e.get("event") in RECORDING_EVENTS],
            [str(e["recording_id"]) for e in entries if e.get("event") == "server_copy_deleted"],
            [int(e["event_seq"]) for e in entries if e.get("event") in ("held", "released")])
        log.info("manifest_segment_taken_up", segment=rel, entries=len(entries),
                 reason="written before an interruption, not yet recorded in the state")
        return new_head

    def _broken(self, problem: str) -> None:
        if problem not in self.problems:  # once per problem, not on every flush
            self.problems.append(problem)
            log.error("manifest_broken", account=self.account, problem=problem,
                      hint="run `voipbin-archiver verify --manifest`; archiving goes on")
        self.ok = False
