"""``voipbin-archiver``: the command line.

Exit codes: 0 success, 1 some recordings failed (or the run could not finish),
2 usage or configuration error, 3 the API refused the credential or the account,
4 a backfill interrupted by SIGTERM or SIGINT (it resumes where it stopped).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from . import __version__
from .config import Config, build_config, default_config_path, load_config
from .errors import AuthRefused, ConfigError, LocalStorageError, StateLocked, StateUnusable
from .export import export
from .find import add_filters, filters_of, query_of, table
from .logs import configure_logging, redact
from .state import FLAGS, STATES, open_state, unusable_message, waiting_count
from .store import mkdir_durable, write_file_atomic

if TYPE_CHECKING:
    from .engine import RunResult

# The engine, the API client and aiohttp (an SSL context at import) are imported by the commands
# that use them, not here: ``find`` and ``export`` answer in a fraction of a second without them.

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_AUTH, EXIT_INTERRUPTED = 0, 1, 2, 3, 4


def _date(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (use YYYY-MM-DD or an ISO 8601 time)") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="voipbin-archiver", description="Archive VoIPbin call recordings to storage you own, verified."
    )
    p.add_argument("--version", action="version", version=f"voipbin-archiver {__version__}")
    p.add_argument("--config", type=Path, help="config file (default: $VOIPBIN_ARCHIVER_CONFIG, then ./config.toml)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="overrides [logging] level")
    p.add_argument("--log-format", choices=("auto", "json", "console"), help="overrides [logging] format")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # --config is accepted after the command too ("voipbin-archiver status --config x.toml")
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file (as before the command)")
    b = sub.add_parser("backfill", parents=[after],
                       help="one-shot: archive every recording (or a date range), then exit")
    b.add_argument("--since", type=_date, help="only recordings created at or after this date (UTC)")
    b.add_argument("--until", type=_date, help="only recordings created before this date (UTC)")
    b.add_argument("--wait", type=float, default=900.0, help="seconds to wait for unfinished recordings (900)")
    b.add_argument("--retry-failed", action="store_true", help="give failed recordings another set of attempts")
    b.add_argument("--no-delete", action="store_true", help="delete nothing from the server in this run")
    sub.add_parser("run", parents=[after], help="the service: a cycle every poll_interval until SIGTERM")
    s = sub.add_parser("status", parents=[after], help="counts per state, oldest pending, last error")
    s.add_argument("--json", action="store_true", help="one JSON object")
    v = sub.add_parser("verify", parents=[after],
                       help="re-hash every archived file against the database and its sidecar")
    v.add_argument("--repair", action="store_true",
                   help="download again what is missing or changed, while the server still has it")
    v.add_argument("--deep", action="store_true",
                   help="a bucket: download and re-hash every object (without it: HEAD size and checksum)")
    v.add_argument("--identity", type=Path, metavar="FILE",
                   help="an encrypted archive: decrypt each body with this age identity and check its plaintext")
    v.add_argument("--manifest", action="store_true",
                   help="prove the archive against its signed manifest: chain, signatures, every file (no API)")
    v.add_argument("--public-key", type=Path, metavar="FILE",
                   help="with --manifest: the public key (default: [archive] signing_key_file + .pub)")
    e = sub.add_parser("expire", parents=[after],
                       help="remove from the archive what is older than [archive] keep_days (not held, not locked)")
    e.add_argument("--dry-run", action="store_true", help="only count what is due, held and locked")
    h = sub.add_parser("hold", parents=[after], help="legal holds: a held recording is never removed")
    hs = h.add_subparsers(dest="hold_command", required=True, metavar="ACTION")
    ha = hs.add_parser("add", parents=[after], help="hold recordings by id, or every one the find filters match")
    ha.add_argument("ids", nargs="*", metavar="ID")
    ha.add_argument("--reason", required=True, help="why (recorded in the audit trail and the manifest)")
    add_filters(ha)
    hl = hs.add_parser("list", parents=[after], help="the recordings under a hold")
    hl.add_argument("--json", action="store_true", help="one JSON object per line")
    hr = hs.add_parser("remove", parents=[after], help="release held recordings")
    hr.add_argument("ids", nargs="+", metavar="ID")
    hr.add_argument("--reason", required=True, help="why (recorded in the audit trail and the manifest)")
    er = sub.add_parser("erase", parents=[after],
                        help="remove one recording from the archive now (a data subject's request)")
    er.add_argument("id", metavar="ID")
    er.add_argument("--reason", required=True, help="why (recorded in the audit trail and the manifest)")
    er.add_argument("--account", help="the [[accounts]] name (with several)")
    k = sub.add_parser("keygen", help="write a new Ed25519 key pair for the signed manifest")
    k.add_argument("--out", type=Path, required=True,
                   help="the private key's file (0600); the public half goes to FILE.pub, for auditors")
    pr = sub.add_parser("prune", parents=[after],
                        help="delete the server's copy of what is archived and due ([retention]), then exit")
    pr.add_argument("--dry-run", action="store_true", help="only count what is due and the bytes it would free")
    im = sub.add_parser("import-state", parents=[after],
                        help="copy a SQLite state into the PostgreSQL state of [state] url (one daemon to several)")
    im.add_argument("sqlite", type=Path, help="the SQLite state database to copy (left as it is)")
    im.add_argument("--account", action="append", default=[], metavar="OLD=NEW",
                    help="import the SQLite file's account OLD as NEW (repeatable; a single-account file's is default)")
    f = sub.add_parser("find", parents=[after],
                       help="list archived recordings by time, number, call...: from the state alone")
    add_filters(f)
    f.add_argument("--json", action="store_true", help="one JSON object per line")
    f.add_argument("--limit", type=int, default=0, help="at most this many (0: all)")
    ex = sub.add_parser("export", parents=[after],
                        help="copy what the filters match into a new folder, re-verified, with SHA256SUMS")
    ex.add_argument("--out", type=Path, required=True, help="a new or empty directory")
    ex.add_argument("--identity", type=Path, metavar="FILE",
                    help="an encrypted archive: decrypt with this age identity file (without it: ciphertext)")
    add_filters(ex)
    d = sub.add_parser("demo", help="archive from the bundled simulator into ./demo-archive (no account needed)")
    d.add_argument("--recordings", type=int, default=60)
    d.add_argument("--directory", type=Path, default=Path("demo-archive"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg: Config | None = None
    try:
        live = args.command in ("backfill", "demo") and sys.stderr.isatty() and args.log_format != "json"
        if args.command == "demo":
            configure_logging(args.log_level or ("warning" if live else "info"), args.log_format or "auto")
            return asyncio.run(_demo(args, live))
        if args.command == "keygen":
            return _keygen(args.out)
        cfg = load_config(args.config or default_config_path())
        # on a terminal, a backfill shows a live progress line; logs would scroll it away
        level = args.log_level or ("warning" if live and cfg.logging.level == "info" else cfg.logging.level)
        configure_logging(level, args.log_format or cfg.logging.format)
        for warning in cfg.warnings:
            structlog.get_logger("archiver.config").warning(warning)
        if args.command == "status":
            return asyncio.run(_status(cfg, args.json))
        if args.command == "verify" and args.manifest:
            if args.repair or args.deep or args.identity:
                raise ConfigError("verify --manifest takes neither --repair, --deep nor --identity (it reads every "
                                  "file, and needs no private key)")
            return asyncio.run(_verify_manifest(cfg, args.public_key))
        if args.command == "verify":
            if args.public_key:
                raise ConfigError("--public-key is for verify --manifest")
            return asyncio.run(_verify(cfg, args.repair, args.deep, args.identity))
        if args.command == "prune":
            return asyncio.run(_prune(cfg, args.dry_run))
        if args.command == "find":
            return asyncio.run(_find(cfg, args))
        if args.command == "export":
            return asyncio.run(_export(cfg, args))
        if args.command in ("expire", "hold", "erase"):
            return asyncio.run(_policy_command(cfg, args))
        if args.command == "import-state":
            return asyncio.run(_import_state(cfg, args.sqlite, args.account))
        from .service import run_engine

        if args.command == "backfill":
            if args.since and args.until and args.since >= args.until:
                raise ConfigError("--since must be before --until")
            run = run_engine(cfg, "backfill", args.since, args.until, args.wait, args.retry_failed, progress=live,
                             no_delete=args.no_delete)
        else:
            run = run_engine(cfg, "run")
        gc.freeze()  # what start-up made lives as long as the process: no collection walks it again
        result, counts, requests = asyncio.run(run)
        _print_summary(args.command, result, counts, requests)
        if result.state_unusable:  # the database was found damaged mid-run: not a clean stop either way
            return EXIT_USAGE
        # the service stops only when asked to (SIGTERM/SIGINT): that is a clean exit
        return EXIT_OK if args.command == "run" else _exit_code(result)
    except (ConfigError, StateLocked, StateUnusable) as exc:
        print(f"voipbin-archiver: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except LocalStorageError as exc:  # e.g. a full disk at start-up, before the engine could pause on it
        print(f"voipbin-archiver: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except sqlite3.Error as exc:  # the database failed under a running command: no traceback, exit 2
        database = cfg.state.database if cfg is not None else "the state database"
        print(f"voipbin-archiver: error: {redact(unusable_message(Path(database), exc))}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as exc:
        print(f"voipbin-archiver: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if not type(exc).__module__.startswith("asyncpg"):
            raise
        # PostgreSQL refused a statement (not an outage: those are LocalStorageError): no traceback
        print(f"voipbin-archiver: error: the PostgreSQL state refused a request ({type(exc).__name__}: "
              f"{redact(str(exc))}); if it persists after an upgrade, report it", file=sys.stderr)
        return EXIT_USAGE


async def _find(cfg: Config, args: argparse.Namespace) -> int:
    """``find``: exit 0 with results, 1 with none."""
    if args.limit < 0:
        raise ConfigError("--limit must be 0 (all) or more")
    query = query_of(args, args.limit)
    prefix = cfg.archive.s3.prefix if cfg.archive.destination == "s3" and cfg.archive.s3 else ""
    state = await open_state(cfg.state, readonly=True)
    try:
        if args.json:
            lines = await state.find_json(query, prefix)
            found = len(lines)
            sys.stdout.write("".join(line + "\n" for line in lines))
        else:
            rows = await state.find(query)
            found = len(rows)
            if rows:
                print(table(rows))
    finally:
        await state.close()
    if not found:
        print("find: no recording matches", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


async def _export(cfg: Config, args: argparse.Namespace) -> int:
    """``export``: exit 0 when every file matched what was archived, 1 otherwise (or when
    nothing matched), 2 for a non-empty ``--out``."""
    report = await export(cfg, query_of(args), args.out, filters_of(args), args.identity)
    if not report.recordings and not report.mismatches and not report.not_archived:
        print("export: no recording matches; nothing written", file=sys.stderr)
        return EXIT_FAILED
    for problem in report.mismatches:
        print(f"export: {problem}", file=sys.stderr)
    print(f"exported {len(report.recordings)} recording(s), {len(report.sums)} file(s), "
          f"{report.bytes / 1e6:.1f} MB to {args.out}"
          + (f"; {len(report.not_archived)} matched but not archived (yet): listed in export.json"
             if report.not_archived else ""))
    if not report.complete:
        print(f"export FAILED: {len(report.mismatches)} recording(s) are not what was archived (above); "
              f"no SHA256SUMS written", file=sys.stderr)
        return EXIT_FAILED
    print(f"check it with: cd {args.out} && sha256sum -c SHA256SUMS")
    return EXIT_OK


def _exit_code(result: RunResult) -> int:
    if result.auth_refused:
        return EXIT_AUTH
    if result.interrupted:
        return EXIT_INTERRUPTED
    if result.fatal or result.walk_error or result.stats["failed"] or result.deletion_error:
        return EXIT_FAILED
    return EXIT_OK


def _print_summary(command: str, result: RunResult, counts: dict[str, int], requests: dict[str, int]) -> None:
    """The final summary table: what this run did, beside what the database holds now."""
    s = result.stats
    waiting = waiting_count(counts)
    mb = s["bytes"] / 1e6
    seconds = float(s.get("seconds", 0) or 0)
    rows: list[tuple[str, object, object]] = [
        ("archived", s["archived"], counts["archived"]),
        *[(f"  of which {flag}", s[f"archived_{flag}"], "") for flag in FLAGS if s[f"archived_{flag}"]],
        ("no audio", s["no_audio"], counts["no_audio"]),
        *([("deleted from server", s["server_deleted"], "")] if s["server_deleted"] else []),
        *([("not deleted: re-verify", s["delete_refused"], "")] if s["delete_refused"] else []),
        ("skipped", s["skipped"], counts["skipped"]),
        ("failed", s["failed"], counts["failed"]),
        ("waiting", "-", waiting),
        ("new recordings", s["discovered"], ""),
        ("pages listed", s["pages"], ""),
        *([("call pages listed", s["call_pages"], ""), ("new calls", s["calls"], "")] if s["call_pages"] else []),
        *([("calls noted late", s["calls_noted"], "")] if s["calls_noted"] else []),
        *([("storage pages listed", s["file_pages"], ""), ("from listed files", s["via_storage_files"], ""),
           ("via /recordingfiles", s["via_recordingfiles"], "")] if s["file_pages"] else []),
        *([("  listed, files unusable", s["fallback_listing"], "")] if s["fallback_listing"] else []),
        *([("  listed, download failed", s["fallback_download"], "")] if s["fallback_download"] else []),
        ("HTTP requests", requests.get("requests", 0), ""),
        ("  of which API", requests.get("requests", 0) - requests.get("storage", 0), ""),
        ("429 answers", requests.get("http_429", 0), ""),
        ("data", f"{mb:.1f} MB", f"{mb / seconds if seconds else 0:.1f} MB/s"),
        ("time", f"{seconds:.1f} s", ""),
    ]
    lines = [f"{command + ' summary':<24}{'this run':>12}{'database':>12}"]
    lines += [f"  {name:<22}{this!s:>12}{total!s:>12}".rstrip() for name, this, total in rows]
    if waiting:
        why = "not ended or files not uploaded yet"
        if result.interrupted:
            why = f"the run was stopped by {result.interrupted}"
        elif result.fatal:
            why = "the run stopped early, see below"
        elif result.abandoned:
            why = f"{result.abandoned} abandoned in flight when the run ended, the rest {why}"
        lines.append(f"still waiting: {waiting} ({why}; the next run continues)")
    if s["no_audio"]:
        lines.append(
            f"no audio: {s['no_audio']} recording(s) have no audio on the server and never will; their metadata "
            "is kept (sidecar). Likely cause: the customer's 10 GB store on the server was full."
        )
    if result.walk_error:
        lines.append(f"listing failed: {result.walk_error}")
    if result.fatal:
        lines.append(f"stopped early: {result.fatal}")
    if result.deletion_error:
        lines.append(f"server deletion incomplete: {result.deletion_error}; still due: {result.deletions_left} "
                     "(the next backfill, prune or the service deletes them)")
    if result.interrupted:
        lines.append(f"interrupted by {result.interrupted}: the next run resumes where this one stopped")
    print("\n".join(lines), flush=True)


async def _import_state(cfg: Config, source: Path, renames: list[str]) -> int:
    from .statemove import import_sqlite, parse_renames

    report = await import_sqlite(cfg, source, parse_renames(renames))
    lines = [f"imported {source} into the PostgreSQL state:"]
    for account, counts in sorted(report.counts.items()):
        states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        lines.append(f"  {account}: {sum(counts.values())} recordings ({states}), "
                     f"{report.archived_bytes.get(account, 0) / 1e6:.1f} MB archived")
    lines.append(f"  {report.walks} walk checkpoint(s), {report.meta} meta value(s), "
                 f"{report.audit_lines} deletion audit line(s)")
    lines += [f"warning: {w}" for w in report.warnings]
    lines.append(f"{source} is left as it was: keep it as the backup of this moment, and start every daemon with "
                 "this config; none of it is downloaded again")
    print("\n".join(lines), flush=True)
    return EXIT_OK


async def _status(cfg: Config, as_json: bool) -> int:
    from .service import status

    try:
        info = await status(cfg)
    except FileNotFoundError:
        info = {**dict.fromkeys(STATES, 0), "total": 0, "oldest_pending": None, "last_error": None,
                "last_cycle": None, "archived_flagged": dict.fromkeys(FLAGS, 0), "flagged_recent": [],
                "api_refused": None, "accesskey_expires": None, "accounts": {}, "note": "no state database yet"}
    if as_json:
        print(json.dumps(info, sort_keys=True))
        return EXIT_OK
    print(_status_table(info))
    return EXIT_OK


def _when(epoch: Any) -> str:
    if epoch in (None, ""):
        return "-"
    return datetime.fromtimestamp(float(epoch), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _status_table(info: dict[str, Any]) -> str:
    width = max(len(s) for s in STATES)
    rows = [f"{state:<{width}}  {info[state]:>10}" for state in STATES]
    rows.append(f"{'total':<{width}}  {info['total']:>10}")
    oldest = info.get("oldest_pending")
    rows.append(
        f"oldest pending: {oldest['id']} (created {_when(oldest['tm_create'])})" if oldest else "oldest pending: -"
    )
    err = info.get("last_error")
    rows.append(f"last error: {err['id']} [{err['state']}] {err['error']}" if err else "last error: -")
    rows.append(f"last service cycle: {_when(info.get('last_cycle'))}")
    flags = info.get("archived_flagged") or {}
    rows.append("archived but imperfect: " + ", ".join(f"{flag} {flags.get(flag, 0)}" for flag in FLAGS))
    for item in info.get("flagged_recent") or []:
        rows.append(f"  {item['id']} [{item['flag'] or item['state']}] {item['flag_reason']}")
    deletion = info.get("server_deletion") or {}
    if deletion:
        rows.append(
            f"server deletion: {'on' if deletion.get('enabled') else 'off'}; deleted {deletion.get('deleted', 0)}, "
            f"due now {deletion.get('due', 0)} ({deletion.get('due_bytes', 0) / 1e6:.1f} MB), "
            f"interrupted {deletion.get('interrupted', 0)}"
        )
        store = deletion.get("server_store")
        if store:
            ratio = store["size"] / store["capacity"] if store.get("capacity") else 0
            rows.append(f"server store: {store['size'] / 1e9:.2f} of {store['capacity'] / 1e9:.2f} GB "
                        f"({100 * ratio:.0f}%, {store['count']} files; read {_when(store['at'])})")
    accounts = info.get("accounts") or {}
    if len(accounts) <= 1:
        refused = info.get("api_refused")
        if refused:
            rows.append(f"API REFUSES US since {_when(refused.get('since'))}: {refused.get('message')}")
        rows.append(_expiry_line("access key expires", info.get("accesskey_expires")))
        return "\n".join(rows)
    rows.append(f"{'account':<32}  " + "  ".join(f"{s:>11}" for s in STATES))
    for name, counts in sorted(accounts.items()):
        rows.append(f"{name:<32}  " + "  ".join(f"{counts.get(s, 0):>11}" for s in STATES))
    for name, counts in sorted(accounts.items()):
        refused = counts.get("api_refused")
        if refused:
            rows.append(f"account {name}: API REFUSES US since {_when(refused.get('since'))}: {refused.get('message')}")
        rows.append(_expiry_line(f"account {name}: access key expires", counts.get("accesskey_expires")))
    return "\n".join(rows)


def _expiry_line(label: str, expires: float | None) -> str:
    from .expiry import expiry_warning

    warning = expiry_warning(expires)
    return f"{label}: {_when(expires)}" + (f"  WARNING: {warning}" if warning else "")


async def _verify(cfg: Config, repair: bool = False, deep: bool = False, identity: Path | None = None) -> int:
    from .service import mark_for_repair, run_engine, verify

    checked, problems, bad = await verify(cfg, deep, identity)
    for problem in problems:
        print(f"BAD  {problem}")
    print(f"verified {checked} archived recordings: {len(problems)} problem(s)")
    if not problems or not repair:
        return EXIT_FAILED if problems else EXIT_OK
    queued, lost = await mark_for_repair(cfg, bad)
    for rec_id, deleted_at in lost:
        print(f"CANNOT REPAIR {rec_id}: the server's copy was deleted at {_when(deleted_at)} after it was "
              "archived; restore the file from your backup (its SHA-256 is in deletions.jsonl and the database)")
    if not queued:
        return EXIT_FAILED
    print(f"downloading {len(queued)} recording(s) again from the server")
    result, counts, requests = await run_engine(cfg, "backfill", wait=60)
    _print_summary("repair", result, counts, requests)
    checked, problems, _ = await verify(cfg, deep)
    print(f"verified again: {checked} archived recordings, {len(problems)} problem(s)")
    return EXIT_FAILED if problems or lost else _exit_code(result)


async def _policy_command(cfg: Config, args: argparse.Namespace) -> int:
    """``expire``, ``hold add|list|remove``, ``erase``: one account's ``policy.Policy`` each."""
    from .service import policy_run

    if args.command == "expire":
        if not cfg.archive.keep_days:
            raise ConfigError("[archive] keep_days is 0: recordings are kept for ever, nothing expires")
        result = await policy_run(cfg, lambda p: p.expire(dry_run=args.dry_run))
        verb = "due" if args.dry_run else "removed"
        print(f"expire (keep_days {cfg.archive.keep_days}): {result.due} due, "
              f"{result.due if args.dry_run else result.removed} {verb}, {result.held} kept under a hold, "
              f"{result.locked} kept by the bucket's lock" + (" (nothing was removed)" if args.dry_run else ""))
        for error in result.errors:
            print(f"error: {error}")
        return EXIT_FAILED if result.errors else EXIT_OK
    if args.command == "erase":
        why = await policy_run(cfg, lambda p: p.erase(args.id, args.reason), account=args.account)
        if why is None:
            why = f"{args.id}: no such recording in the state"
        if why:
            print(f"voipbin-archiver: erase refused: {why}", file=sys.stderr)
            return EXIT_FAILED
        print(f"erased {args.id} from the archive ({args.reason})")
        return EXIT_OK
    if args.hold_command == "list":
        from .service import list_holds

        holds = await list_holds(cfg)
        for h in holds:
            if args.json:
                print(json.dumps(h, sort_keys=True))
            else:
                print(f"{_when(h['held_at'])}  {h['account']}  {h['recording_id']}  {h['reason']}")
        if not args.json:
            print(f"{len(holds)} recording(s) under a hold")
        return EXIT_OK
    ids = list(args.ids)
    if args.hold_command == "add" and any(getattr(args, f, None) for f in ("since", "until", "number", "call",
                                                                            "recording", "direction", "state")):
        state = await open_state(cfg.state, readonly=True)
        try:
            ids += [r["recording_id"] for r in await state.find(query_of(args, 0))]
        finally:
            await state.close()
    if not ids:
        raise ConfigError(f"hold {args.hold_command}: name recordings (IDs, or find's filters)")
    hold = args.hold_command == "add"
    changed = await policy_run(cfg, lambda p: (p.hold if hold else p.release)(ids, args.reason),
                               account=getattr(args, "account", None))
    print(f"{'held' if hold else 'released'} {len(changed)} recording(s)"
          + (f" ({len(set(ids)) - len(changed)} already so or unknown)" if len(set(ids)) != len(changed) else ""))
    return EXIT_OK


def _keygen(out: Path) -> int:
    from .manifest import keygen

    public, key_id = keygen(out)
    print(f"wrote the private key to {out} (mode 0600) and its public half to {public}")
    print(f"key id {key_id}: set [archive] signing_key_file = \"{out}\"; give {public.name} to your auditors "
          "and keep a copy of it away from this host")
    return EXIT_OK


async def _verify_manifest(cfg: Config, public_key: Path | None) -> int:
    from .service import verify_manifest_of

    report, with_state = await verify_manifest_of(cfg, public_key)
    for problem in report.problems:
        print(f"BAD  {problem}")
    pending = f", {report.pending} archived after the newest segment (checked against the state)" \
        if report.pending else ""
    print(f"manifest: {report.segments} segment(s), {report.recordings} recording(s), {report.files_checked} "
          f"file(s) re-hashed ({report.bytes_checked / 1e6:.1f} MB){pending}: {len(report.problems)} problem(s)"
          + ("" if with_state else " (without the state database)"))
    return EXIT_FAILED if report.problems else EXIT_OK


async def _prune(cfg: Config, dry_run: bool) -> int:
    from .service import prune

    if not dry_run and not cfg.retention.delete_from_server:
        raise ConfigError("[retention] delete_from_server is false: nothing is deleted from the server "
                          "(set it to true to prune; `prune --dry-run` shows what would be)")
    try:
        result = await prune(cfg, dry_run)
    except AuthRefused as exc:
        print(f"voipbin-archiver: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_AUTH
    if dry_run:
        print(f"due for deletion from the server now: {result.due} recordings, {result.due_bytes / 1e6:.1f} MB "
              f"(delete_after {cfg.retention.delete_after:.0f} s; nothing was deleted)")
        return EXIT_OK
    print(f"deleted from the server: {result.deleted} (already gone: {result.already_gone}); "
          f"not deleted, failed re-verification: {result.refused}")
    for error in result.errors:
        print(f"error: {error}")
    return EXIT_FAILED if result.refused or result.errors else EXIT_OK


async def _demo(args: argparse.Namespace, live: bool) -> int:
    """Start the simulator on 127.0.0.1 and archive from it, as a newcomer's first look."""
    from .service import run_engine
    from .simulator import SimConfig, Simulator

    log = structlog.get_logger("archiver.demo")
    sim = Simulator(SimConfig(recordings=args.recordings, pending=3, late_files=3, deleted=2, end_after=3.0,
                              files_after=4.0))
    await sim.start()
    directory = args.directory.resolve()
    log.info("demo_start", simulator=sim.base_url, archive=str(directory))
    key = directory / "signing.key"  # the manifest is signed with a key of the demo's own
    try:
        if not key.exists():
            from .manifest import keygen

            mkdir_durable(directory)
            keygen(key)
        cfg = build_config(
            {
                "api": {"base_url": sim.base_url, "accesskey": sim.accesskey, "page_size": 20},
                "archive": {"directory": str(directory / "recordings"), "settle_window": 30,
                            "signing_key_file": str(key)},
                "state": {"database": str(directory / "state.sqlite3")},
                "workers": {"poll_backoff_min": 1, "poll_backoff_max": 2, "retry_backoff_min": 1},
            },
            base_dir=Path.cwd(), env={},
        )
        result, counts, requests = await run_engine(cfg, "backfill", wait=60, progress=live)
    finally:
        await sim.stop()
    _print_summary("demo", result, counts, requests)
    demo_config = directory / "config.toml"
    _write_demo_config(demo_config, cfg)
    print(f"archive: {directory / 'recordings'}  (see `find {args.directory} -name '*.json' | head`)")
    print("look at it with:")
    print(f"  voipbin-archiver --config {demo_config} status")
    print(f"  voipbin-archiver --config {demo_config} verify")
    print(f"  voipbin-archiver --config {demo_config} verify --manifest --public-key {key}.pub")
    await _demo_find(cfg, demo_config)
    return _exit_code(result)


async def _demo_find(cfg: Config, demo_config: Path) -> None:
    """The archive answering: the recordings of one caller, and the export that hands them over."""
    from .state import FindQuery

    state = await open_state(cfg.state, readonly=True)
    try:
        rows = await state.find(FindQuery(state="archived"))
        number = next((r["source"] for r in rows if r["source"] and r["direction"] == "incoming"), None)
        found = await state.find(FindQuery(number=number[1:])) if number else []
    finally:
        await state.close()
    if not number:
        return
    print(f"ask it (from the state alone): every recording of {number}:")
    print(f"  voipbin-archiver --config {demo_config} find --number {number}")
    print("    " + table(found).replace("\n", "\n    "))
    print("hand them over, each file re-verified, with SHA256SUMS:")
    print(f"  voipbin-archiver --config {demo_config} export --number {number} --out demo-production")
    print("  (cd demo-production && sha256sum -c SHA256SUMS)")


def _write_demo_config(path: Path, cfg: Config) -> None:
    """The demo's archive and database, for ``status`` and ``verify`` (the simulator is gone, so
    its address and key are only there to make the file complete)."""
    text = (
        "# written by `voipbin-archiver demo`: the demo archive, for status and verify\n"
        f"[api]\nbase_url = {json.dumps(cfg.api.base_url)}\naccesskey = {json.dumps(cfg.api.accesskey)}\n"
        f"[archive]\ndirectory = {json.dumps(str(cfg.archive.directory))}\n"
        f"signing_key_file = {json.dumps(cfg.archive.signing_key_file)}\n"
        f"[state]\ndatabase = {json.dumps(str(cfg.state.database))}\n"
    )
    write_file_atomic(path, text.encode(), mode=0o600)


def entry() -> None:
    sys.exit(main())
