"""Fuzzing what the server sends: ZIPs, WAVs, listing pages, error bodies, member names.

Property-based (hypothesis): valid inputs built from parts, then damaged at random. Whatever
comes in, the parsers give a verdict or one of our own errors, never an exception that escapes,
never a file outside the directory they were given, never memory beyond the limits.

The budget is small in CI (``FUZZ_EXAMPLES``, default 2,000 per target: under a minute in all);
by hand: ``FUZZ_EXAMPLES=20000 pytest -m fuzz``. Every input that once found a bug is kept in
``tests/fuzz_corpus/`` and replayed by ``test_corpus``.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archiver.client import _error_info
from archiver.errors import ArchiverError, InvalidRecording, VerificationError
from archiver.inspect import RiffChecker, ZipLimits, inspect_zip, list_zip_members
from archiver.layout import sanitize_member_name
from archiver.model import parse_timestamp
from archiver.paginate import parse_page

pytestmark = pytest.mark.fuzz

CORPUS = Path(__file__).parent / "fuzz_corpus"
BUDGET = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "2000")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
LIMITS = ZipLimits(max_members=50, max_member_bytes=1 << 20, max_total_bytes=4 << 20, max_ratio=100.0)
NAME_MAX = 255  # bytes in one path component (Linux)


# ---- the properties ---------------------------------------------------------------------------


def keeping(suffix: str) -> Any:
    """With ``FUZZ_SAVE=1``, a failing input is written to ``tests/fuzz_corpus/new-*`` (the last
    one written is hypothesis's shrunk example): rename it and commit it to the corpus."""

    def wrap(check: Any) -> Any:
        def run(data: Any, *args: Any) -> None:
            try:
                check(data, *args)
            except Exception:
                if os.environ.get("FUZZ_SAVE"):
                    CORPUS.mkdir(exist_ok=True)
                    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
                    (CORPUS / f"new-{check.__name__}{suffix}").write_bytes(raw)
                raise

        return run

    return wrap


@keeping(".zip")

def check_zip(data: bytes, extract_to: Path | None) -> None:
    """A verdict or our own error; extracted files only directly inside ``extract_to``; every
    name one safe component short enough for the filesystem."""
    outside = extract_to.parent if extract_to is not None else None
    before = sorted(os.listdir(outside)) if outside is not None else []
    try:
        members = inspect_zip(io.BytesIO(data), LIMITS, extract_to)
    except (VerificationError, InvalidRecording):
        members = None
    if outside is not None:  # the same bytes from a real file: its errors are the bytes', not the disk's
        on_disk = outside.parent / f"{outside.name}.body"
        on_disk.write_bytes(data)
        try:
            inspect_zip(on_disk, LIMITS, None)
        except (VerificationError, InvalidRecording):
            pass
        finally:
            on_disk.unlink()
    if outside is not None and extract_to is not None:
        assert sorted(os.listdir(outside)) == before, "something was written beside the extraction directory"
        for entry in os.scandir(extract_to):
            assert entry.is_file(follow_symlinks=False), f"{entry.name}: not a plain file"
            check_safe_name(entry.name)
        if members is not None:
            assert sorted(os.listdir(extract_to)) == sorted(m.stored_as for m in members)
    for member in list_zip_members(io.BytesIO(data)):  # the description of a damaged body
        assert isinstance(member.name, str) and len(member.name) <= 200


@keeping(".wav")
def check_wav(data: bytes, cuts: list[int]) -> None:
    riff = RiffChecker()
    start = 0
    try:
        for end in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
            riff.feed(data[start:end])
            start = max(start, end)
        riff.finish()
    except VerificationError:
        return
    assert riff.data_bytes >= 0


@keeping(".page.json")
def check_page(body: Any) -> None:
    page = parse_page(body, "")
    for rec in page.recordings:
        assert isinstance(rec.id, str) and len(rec.id) == 36
    json.dumps([r.raw for r in page.recordings])  # what is kept must serialise (SQLite, sidecar)


def check_safe_name(name: str) -> None:
    assert name and name not in (".", "..") and not name.startswith(".")
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert len(name.encode("utf-8")) <= NAME_MAX, f"{len(name.encode())} bytes: the filesystem refuses it"


# ---- inputs -------------------------------------------------------------------------------------


def wav_bytes(frames: bytes, channels: int = 1, rate: int = 8000, bits: int = 16, extra: bytes = b"") -> bytes:
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra + b"data" + struct.pack("<I", len(frames))
    body += frames + (b"\0" if len(frames) & 1 else b"")
    return b"RIFF" + struct.pack("<I", len(body)) + body


names = st.one_of(
    st.sampled_from(["a.wav", "../../etc/passwd", "/abs.wav", "dir/x.wav", "..", ".", "", "C:\\x.wav", "é" * 120,
                     "é" * 300, "\U00010000" * 150, "e\u0301" * 100, "\ufb03" * 200]),
    st.text(min_size=0, max_size=300),
)
members = st.lists(
    st.tuples(names, st.binary(max_size=3000), st.booleans(), st.booleans()), min_size=0, max_size=6
)


def build_zip(parts: list[tuple[str, bytes, bool, bool]]) -> bytes:
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as archive:
        warnings.simplefilter("ignore")  # duplicate names are wanted here
        for name, payload, as_wav, deflate in parts:
            info = zipfile.ZipInfo(name or "empty")
            info.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
            archive.writestr(info, wav_bytes(payload) if as_wav else payload)
    return out.getvalue()


mutations = st.lists(
    st.tuples(st.sampled_from(["flip", "cut", "insert", "zero", "dup"]), st.integers(0, 1 << 16),
              st.binary(min_size=1, max_size=8)),
    max_size=4,
)


def mutate(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, blob in edits:
        if not buf:
            break
        i = pos % len(buf)
        if kind == "flip":
            buf[i] ^= blob[0] or 1
        elif kind == "cut":
            del buf[i:]
        elif kind == "insert":
            buf[i:i] = blob
        elif kind == "zero":
            buf[i : i + len(blob)] = bytes(len(buf[i : i + len(blob)]))
        else:
            buf += buf[i : i + 64]
    return bytes(buf)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
timestamps = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2024-02-30T00:00:00Z",
                     "2024-01-01 00:00:00.1234567890", "9999-01-01 00:00:00.000000", "0001-01-01T00:00:00Z"]),
    st.datetimes().map(lambda d: d.isoformat()),
    json_values,
)
recordings = st.fixed_dictionaries(
    {
        "id": st.one_of(st.uuids().map(str), st.uuids().map(lambda u: str(u).upper()), st.text(max_size=40)),
        "status": st.one_of(st.sampled_from(["ended", "recording", "initiating", "stopping"]), json_values),
        "reference_type": st.one_of(st.sampled_from(["call", "confbridge", ""]), json_values),
        "format": st.one_of(st.sampled_from(["wav", "", "../x"]), json_values),
        "tm_create": timestamps, "tm_end": timestamps, "tm_delete": timestamps,
    },
    optional={"extra": json_values},
)
pages = st.one_of(
    json_values,
    st.fixed_dictionaries({"result": st.lists(st.one_of(recordings, json_values), max_size=5),
                           "next_page_token": st.one_of(timestamps, json_values)}),
)


# ---- the fuzz targets ---------------------------------------------------------------------------


@BUDGET
@given(members, mutations)
def test_zip_inspector(tmp_path_factory: pytest.TempPathFactory, parts: Any, edits: Any) -> None:
    data = mutate(build_zip(parts), edits)
    check_zip(data, None)


@BUDGET
@given(members, mutations)
def test_zip_extraction_stays_inside(tmp_path_factory: pytest.TempPathFactory, parts: Any, edits: Any) -> None:
    base = tmp_path_factory.mktemp("x")
    (base / "unpack").mkdir()
    check_zip(mutate(build_zip(parts), edits), base / "unpack")


@BUDGET
@given(st.binary(max_size=4000), st.lists(st.integers(0, 5000), max_size=6), mutations,
       st.binary(max_size=64), st.integers(0, 3), st.integers(0, 200_000), st.integers(0, 40))
def test_wav_checker(data: bytes, cuts: list[int], edits: Any, extra: bytes, ch: int, rate: int, bits: int) -> None:
    check_wav(mutate(wav_bytes(data, ch, rate, bits, extra), edits), cuts)
    check_wav(data, cuts)


@BUDGET
@given(pages)
def test_listing_pages(body: Any) -> None:
    check_page(body)


@BUDGET
@given(timestamps)
def test_timestamps(value: Any) -> None:
    try:
        parsed = parse_timestamp(value)
    except ValueError:
        return
    assert parsed is None or parsed.utcoffset() is not None


@BUDGET
@given(st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()),
                 st.fixed_dictionaries({"error": json_values}).map(lambda v: json.dumps(v).encode())))
def test_error_bodies(body: bytes) -> None:
    info = _error_info(body)
    for text in (info.reason, info.request_id, info.limited_by):
        assert len(text) <= 100 and text.isprintable()


@BUDGET
@given(names)
def test_member_names(name: str) -> None:
    check_safe_name(sanitize_member_name(name))


# ---- hand-made hostile inputs and the corpus ------------------------------------------------------


def test_a_zip_bomb_stays_within_memory(tmp_path: Path) -> None:
    """A member whose deflate stream expands 1000x past what its header declares: refused,
    and the check never holds more than a few of its read chunks in memory."""
    frames = bytes(64 << 20)
    deflated = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = deflated.compress(frames) + deflated.flush()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("small.wav", wav_bytes(b"\0" * 1000), zipfile.ZIP_DEFLATED)
    data = bytearray(out.getvalue())
    # swap in the bomb's stream, keeping the small declared sizes (the local and central headers lie)
    header_end = 30 + len("small.wav")
    old_size = struct.unpack("<I", data[18:22])[0]
    central = data[header_end + old_size :]
    offset = central.find(b"PK\x01\x02")
    central[offset + 20 : offset + 24] = struct.pack("<I", len(stream))
    eocd = central.find(b"PK\x05\x06")
    central[eocd + 16 : eocd + 20] = struct.pack("<I", header_end + len(stream))
    data[18:22] = struct.pack("<I", len(stream))
    bomb = bytes(data[:header_end]) + stream + bytes(central)
    tracemalloc.start()
    try:
        with pytest.raises(ArchiverError):
            inspect_zip(io.BytesIO(bomb), LIMITS, None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak / 2**20:.1f} MiB while checking a {len(bomb)}-byte bomb"


def test_a_thousand_members_of_one_long_name_unpack_side_by_side(tmp_path: Path) -> None:
    """Repeats of a name get numbered prefixes, each still within the filesystem's 255 bytes
    (once, each repeat grew by one underscore until the name no longer fitted)."""
    long_name = "é" * 150 + ".wav"
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as archive:
        warnings.simplefilter("ignore")
        for _ in range(300):
            archive.writestr(long_name, wav_bytes(b"\1\2"))
    (tmp_path / "unpack").mkdir()
    limits = ZipLimits(max_members=1000)
    found = inspect_zip(io.BytesIO(out.getvalue()), limits, tmp_path / "unpack")
    stored = [m.stored_as or "" for m in found]
    assert len(set(stored)) == 300 and sorted(os.listdir(tmp_path / "unpack")) == sorted(stored)
    for name in stored:
        check_safe_name(name)


def corpus_cases() -> list[Path]:
    return sorted(p for p in CORPUS.iterdir() if p.is_file()) if CORPUS.is_dir() else []


@pytest.mark.parametrize("case", corpus_cases(), ids=lambda p: p.name)
def test_corpus(case: Path, tmp_path: Path) -> None:
    """Inputs that once found a bug: ``*.zip`` (inspected and extracted), ``*.wav``, ``*.page.json``
    (a listing answer), ``*.name.json`` (a member name), ``*.error`` (an error body)."""
    data = case.read_bytes()
    if case.suffix == ".zip":
        (tmp_path / "unpack").mkdir()
        check_zip(data, None)
        check_zip(data, tmp_path / "unpack")
    elif case.suffix == ".wav":
        check_wav(data, [])
    elif case.name.endswith(".page.json"):
        check_page(json.loads(data))
    elif case.name.endswith(".name.json"):
        check_safe_name(sanitize_member_name(json.loads(data)))
    elif case.suffix == ".error":
        _error_info(data)
    else:
        raise AssertionError(f"{case.name}: unknown corpus kind")
