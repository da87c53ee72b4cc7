"""``verify --manifest``: prove the archive is what its signed manifest says (``manifest``).

It needs the archive and the public key only: the chain of each account's segments must be
unbroken from segment 1, every signature valid, every file the newest entries list present with
their SHA-256, and every other file of the archive a note beside a listed recording (its sidecar,
transcript, call). With the state at hand too (the daemon's host), it also knows the chain's head
(a deleted newest segment) and what was archived after the newest segment (checked against the
state's SHA-256 instead of being called a stranger).
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .destinations import Destination
from .layout import NOTE_SUFFIXES, beside_rel
from .manifest import DIRECTORY, RECORDING_EVENTS, open_segment, parse_segment_rel, sha256_hex


@dataclass(frozen=True)
class Segment:
    account: str
    seq: int
    rel: str
    sha256: str
    doc: dict[str, Any] | None  # None: unreadable


@dataclass
class Chain:
    """One account's segments as found, in order, and what is wrong with them."""

    segments: list[Segment] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def newest(self) -> Segment | None:
        return self.segments[-1] if self.segments else None


@dataclass(frozen=True)
class Expected:
    """A file the manifest (or, after its newest segment, the state) says the archive holds."""

    sha256: str
    size: int
    recording_id: str
    source: str  # "segment 00000012 of account default", or "the state (not in a segment yet)"


@dataclass
class ManifestReport:
    segments: int = 0
    recordings: int = 0
    files_checked: int = 0
    bytes_checked: int = 0
    pending: int = 0  # archived after the newest segment, checked against the state
    problems: list[str] = field(default_factory=list)


def segment_rels(files: list[tuple[str, int]]) -> tuple[dict[str, list[tuple[int, str]]], list[str]]:
    """The segments among an archive's files, by account ((seq, path) each), and the other files
    under ``manifests/`` (which no archiver wrote)."""
    chains: dict[str, list[tuple[int, str]]] = defaultdict(list)
    strays = []
    for rel, _ in files:
        if not rel.startswith(DIRECTORY + "/"):
            continue
        parsed = parse_segment_rel(rel)
        if parsed is None:
            strays.append(rel)
        else:
            chains[parsed[0]].append((parsed[1], rel))
    return chains, strays


async def read_chain(destination: Destination, account: str, rels: list[tuple[int, str]],
                     public: Ed25519PublicKey) -> Chain:
    """Each segment read and checked: its signature, its number against its name and the one
    before it, and its link (the previous segment's SHA-256)."""
    chain = Chain()
    last: Segment | None = None
    for seq, rel in sorted(rels):
        data = await destination.read_bytes(rel)
        if data is None:
            chain.problems.append(f"{rel}: listed but unreadable")
            continue
        doc, why = open_segment(data, public)
        segment = Segment(account, seq, rel, sha256_hex(data), doc)
        if why:
            chain.problems.append(f"{rel}: {why}")
        if doc is not None:
            if doc.get("seq") != seq or doc.get("account") != account:
                chain.problems.append(f"{rel}: its name says segment {seq} of account {account}, its content says "
                                      f"segment {doc.get('seq')} of account {doc.get('account')} (renamed or moved)")
        expected_seq = last.seq + 1 if last else 1
        if last is not None and seq == last.seq:
            chain.problems.append(f"{rel}: a second segment numbered {seq} (beside {last.rel}): one is not ours")
        elif seq != expected_seq:
            gone = f"{expected_seq}" if seq == expected_seq + 1 else f"{expected_seq} to {seq - 1}"
            chain.problems.append(f"account {account}: segment {gone} missing (deleted): the chain goes from "
                                  f"{last.rel if last else 'its start'} to {rel}")
        elif doc is not None:
            previous = doc.get("previous_sha256")
            want = last.sha256 if last else None
            if previous != want:
                chain.problems.append(
                    f"{rel}: names the previous segment's SHA-256 {str(previous)[:16]}..., but "
                    + (f"{last.rel} hashes to {want[:16]}... (replaced, edited or reordered)" if last and want
                       else "it is the first segment (one before it was removed)"))
        chain.segments.append(segment)
        last = segment
    return chain


def newest_entries(chains: dict[str, Chain]) -> dict[tuple[str, str], tuple[dict[str, Any], Segment]]:
    """Each recording's newest ``archived``, ``expired`` or ``erased`` entry, by (account, id),
    with the segment that holds it: what the archive must hold of it now."""
    newest: dict[tuple[str, str], tuple[dict[str, Any], Segment]] = {}
    for chain in chains.values():
        for segment in chain.segments:
            for entry in (segment.doc or {}).get("entries", []):
                if isinstance(entry, dict) and entry.get("event") in RECORDING_EVENTS:
                    newest[(str(entry.get("account")), str(entry.get("recording_id")))] = (entry, segment)
    return newest


def latest_files(chains: dict[str, Chain]) -> tuple[dict[str, Expected], dict[str, str], int]:
    """What the newest entries say the archive holds: (the hashed files, by path; the note files
    allowed beside each recording's body: path -> the body's SHA-256 for a sidecar, "" for the
    rest; how many recordings)."""
    newest = newest_entries(chains)
    expected: dict[str, Expected] = {}
    notes: dict[str, str] = {}
    sources: dict[tuple[int, str], str] = {}  # one string per segment, not per file
    for (account, rec_id), (entry, segment) in newest.items():
        if entry.get("event") != "archived":  # expired or erased: its files are gone
            continue
        source = sources.get((segment.seq, account))
        if source is None:
            source = sources[(segment.seq, account)] = f"segment {segment.seq:08d} of account {account}"
        path = str(entry.get("path"))
        stem = beside_rel(path, "")  # "<dir>/<id>."
        for suffix in NOTE_SUFFIXES:
            notes[stem + suffix] = ""
        if entry.get("state") == "archived":
            sha = str(entry.get("sha256"))
            expected[path] = Expected(sha, int(entry.get("size") or 0), rec_id, source)
            notes[stem + "json"] = sha
            for member in entry.get("files") or ():
                if isinstance(member, dict):
                    expected[str(member.get("path"))] = Expected(str(member.get("sha256")),
                                                                 int(member.get("size") or 0), rec_id, source)
    return expected, notes, len(newest)


StateFiles = Callable[[], Awaitable[dict[str, Expected | None]]]


async def verify_manifest(
    destination: Destination, public: Ed25519PublicKey, *, heads: dict[str, dict[str, Any]] | None = None,
    state_files: StateFiles | None = None, ignore: set[str] | None = None,
) -> ManifestReport:
    """Check the archive against its manifest (see the module doc). ``heads``: each account's
    chain head as the state recorded it before the archive was listed; ``state_files``: what the
    state holds now (path: the body's SHA-256, or None for a sidecar alone), asked only about
    files no entry lists (archived after the newest segment, or while this ran); ``ignore``:
    files that are not the archive's (the state database beside it)."""
    report = ManifestReport()
    files = await destination.list_files()
    rels, strays = segment_rels(files)
    report.problems += [f"{rel}: in {DIRECTORY}/ but not a segment (not written by the archiver)" for rel in strays]
    chains = {account: await read_chain(destination, account, listed, public) for account, listed in rels.items()}
    for account, head in (heads or {}).items():
        _check_head(chains.get(account), account, head, report.problems)
    for chain in chains.values():
        report.segments += len(chain.segments)
        report.problems += chain.problems
    expected, notes, report.recordings = latest_files(chains)
    removed = removed_files(chains)
    present = dict(files)
    to_hash: list[str] = []
    sidecars: list[str] = []
    unlisted: list[str] = []
    for rel, _ in files:
        if rel.startswith(DIRECTORY + "/") or rel in (ignore or set()):
            continue
        if rel in expected:
            to_hash.append(rel)
        elif rel in notes:
            if notes[rel]:
                sidecars.append(rel)
        elif rel in removed:
            report.problems.append(f"{rel}: still in the archive, but {removed[rel]}")
        else:
            unlisted.append(rel)
    for rel, want in expected.items():
        if rel not in present:
            report.problems.append(f"{rel}: missing (recording {want.recording_id}, listed in {want.source})")
    if state_files is not None:  # archived since the newest segment: the state knows them
        known = await state_files()
        beside = {beside_rel(rel, suffix) for rel in known for suffix in NOTE_SUFFIXES}
        for rel, held in known.items():
            if held is not None and rel not in present and rel not in expected:
                report.problems.append(f"{rel}: missing (recording {held.recording_id}, archived in the state "
                                       "after the newest segment found)")
        for rel in unlisted:
            held = known.get(rel)
            if held is not None:
                expected[rel] = held
                to_hash.append(rel)
                report.pending += 1
            elif rel not in known and rel not in beside:
                _unlisted(report, rel)
    else:
        for rel in unlisted:
            _unlisted(report, rel)
    # both at once: the sidecars are parsed here while the bodies are hashed elsewhere
    hashed, texts = await asyncio.gather(destination.hash_files(to_hash), destination.read_files(sidecars))
    for rel in to_hash:
        got, want = hashed[rel], expected[rel]
        if got is None:
            report.problems.append(f"{rel}: unreadable or a symlink (recording {want.recording_id})")
            continue
        report.files_checked += 1
        report.bytes_checked += got[0]
        if got != (want.size, want.sha256):
            report.problems.append(f"{rel}: changed (sha256 {got[1][:16]}..., size {got[0]}; {want.source} says "
                                   f"{want.sha256[:16]}..., size {want.size}; recording {want.recording_id})")
    for rel, data in texts.items():
        try:
            agrees = json.loads(data or b"")["archive"].get("sha256") == notes[rel]
        except (ValueError, KeyError, TypeError, AttributeError):
            agrees = False
        if not agrees:
            report.problems.append(f"{rel}: the sidecar does not name the SHA-256 the manifest lists for its body")
    return report


def removed_files(chains: dict[str, Chain]) -> dict[str, str]:
    """The body and notes of each recording whose newest entry removed it: path -> which entry."""
    newest = newest_entries(chains)
    gone: dict[str, str] = {}
    for (account, _), (entry, segment) in newest.items():
        if entry.get("event") in ("expired", "erased"):
            path = str(entry.get("path"))
            why = f"segment {segment.seq:08d} of account {account} says it was {entry.get('event')}"
            for rel in (path, *(beside_rel(path, suffix) for suffix in NOTE_SUFFIXES)):
                gone[rel] = why
    return gone


def _unlisted(report: ManifestReport, rel: str) -> None:
    report.problems.append(f"{rel}: in the archive but in no manifest entry (added behind the archiver's back)")


def _check_head(chain: Chain | None, account: str, head: dict[str, Any], problems: list[str]) -> None:
    """The state's record of the newest segment it wrote against the newest one found."""
    seq = int(head.get("seq", 0))
    newest = chain.newest if chain else None
    if newest is None or newest.seq < seq:
        problems.append(f"account {account}: segment {seq} ({head.get('rel')}) was written (the state's chain head) "
                        f"but the newest found is {newest.rel if newest else 'none'}: deleted")
    elif newest.seq == seq and newest.sha256 != head.get("sha256"):
        problems.append(f"{newest.rel}: not the segment the archiver wrote (its SHA-256 was "
                        f"{str(head.get('sha256'))[:16]}...): replaced")
