"""The ``dicom-gateway`` command (composition root for the command line)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gateway import __version__, audit
from gateway.config import Settings, SettingsError, load_settings
from gateway.core import Gateway, data_folder_errors
from gateway.errors import GatewayError
from gateway.ingest import IngestResult, read_part10
from gateway.metrics import METRICS

logger = logging.getLogger("gateway")


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record (``[log_format] = "json"``): ``time`` (ISO 8601, UTC),
    ``level``, ``logger``, ``message``, and ``exception`` with the traceback when there is one.

    >>> record = logging.LogRecord("gateway", logging.INFO, "", 0, "stored %d", (3,), None)
    >>> record.created = 0.0
    >>> JsonLinesFormatter().format(record)
    '{"time":"1970-01-01T00:00:00.000Z","level":"INFO","logger":"gateway","message":"stored 3"}'
    """

    def format(self, record: logging.LogRecord) -> str:
        import time

        import orjson

        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry = {
            "time": f"{stamp}.{int(record.created % 1 * 1000):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr at ``level``, as text lines or JSON lines (``log_format``)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLinesFormatter() if log_format == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    detail = logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING
    # pynetdicom logs every PDU at INFO, Alembic its plugins and context at each start: keep
    # their details for DEBUG, so that a start at INFO says what the gateway does.
    for noisy in ("pynetdicom", "alembic"):
        logging.getLogger(noisy).setLevel(detail)


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    return load_settings(args.config, **overrides)


# -- serve -------------------------------------------------------------------------------------
def metrics_directory(settings: Settings) -> Path:
    """Where the processes of ``serve`` keep their metrics (emptied when ``serve`` starts)."""
    return settings.data_dir / "metrics"


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.server import serve_forever

    overrides = {"demo": True} if args.demo else {}
    settings = _settings(args, **overrides)
    if args.config:
        os.environ["GATEWAY_CONFIG"] = args.config  # DIMSE worker processes read the same file
    configure_logging(settings.log_level, settings.log_format)
    with data_folder_errors(settings):
        METRICS.use_directory(metrics_directory(settings), clear=True)
    with Gateway(settings) as gateway:
        asyncio.run(serve_forever(gateway))
    return 0


def cmd_dimse_worker(args: argparse.Namespace) -> int:
    """A DIMSE worker process started by ``serve`` when ``[dimse] workers`` > 1."""
    from gateway.server import run_dimse_worker

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format)
    with data_folder_errors(settings):
        METRICS.use_directory(metrics_directory(settings), clear=False)
    gateway = Gateway(settings).open(recover=False)
    try:
        run_dimse_worker(gateway, args.port)
    finally:
        gateway.close()
    return 0


# -- ingest ------------------------------------------------------------------------------------
def iter_files(paths: Sequence[str]) -> Iterator[Path]:
    for name in paths:
        path = Path(name)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for file in sorted(files):
                    yield Path(root) / file
        elif path.exists():
            yield path
        else:
            raise SettingsError(f"{name}: no such file or folder")


def ingest_paths(gateway: Gateway, paths: Sequence[str], *, progress: bool = True,
                 workers: int = 4) -> tuple[Counter[str], list[tuple[Path, str]]]:
    """Ingest files and folders (recursively); return outcome counts and the rejections.

    The run is one entry per study in the access trail ("DICOM Instances Transferred",
    PS3.15 A.5.3), naming the instances stored, written when the run ends (or stops).
    """
    from tqdm import tqdm

    files = list(iter_files(paths))
    counts: Counter[str] = Counter()
    rejected: list[tuple[Path, str]] = []
    stored = audit.StoredInstances()

    def one(path: Path) -> tuple[Path, IngestResult | str]:
        try:
            return path, gateway.ingestor.ingest(read_part10(path), source="cli")
        except GatewayError as exc:
            return path, f"{type(exc).__name__}: {exc}"
        except OSError as exc:
            return path, f"cannot read: {exc.strerror}"

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
            total=len(files), unit="file", disable=not progress, file=sys.stderr
        ) as bar:
            for path, outcome in pool.map(one, files):
                if isinstance(outcome, str):
                    counts["rejected"] += 1
                    rejected.append((path, outcome))
                else:
                    counts[outcome.outcome.value] += 1
                    stored.add(outcome.study_instance_uid, outcome.sop_instance_uid)
                bar.update(1)
    finally:
        audit.record_stored(gateway.audit, stored, principal=f"cli:{_local_user()}",
                            address="localhost",
                            detail=f"ingest: {len(stored)} stored, {len(rejected)} rejected")
    return counts, rejected


def _local_user() -> str:
    """Who ran the command, for the trail (the login name; ``unknown`` if there is none)."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def cmd_ingest(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging("WARNING" if not args.verbose else settings.log_level)
    with Gateway(settings) as gateway:
        counts, rejected = ingest_paths(gateway, args.paths, progress=not args.quiet)
    print(f"stored: {counts['stored'] + counts['replaced']}, duplicates: {counts['duplicate']}, "
          f"rejected: {counts['rejected']}")
    for path, reason in rejected:
        print(f"  rejected {path}: {reason}")
    return 1 if rejected else 0


# -- demo --------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    from sample_dicom.generator import write_demo_study

    settings = _settings(args)
    configure_logging("WARNING")
    with Gateway(settings) as gateway, tempfile.TemporaryDirectory() as tmp:
        files = write_demo_study(Path(tmp))
        counts, rejected = ingest_paths(gateway, [str(f) for f in files], progress=False)
        for path, reason in rejected:
            print(f"rejected {path.name}: {reason}", file=sys.stderr)
        from pydicom import dcmread

        first = dcmread(files[0], stop_before_pixels=True)
        study = str(first.StudyInstanceUID)
        from viewer_links.cli import demo_link

        link = demo_link(gateway, study, str(first.PatientID))
    base = settings.http.base_url or f"http://{settings.http.host}:{settings.http.port}"
    print(f"sample study {study}: {counts['stored']} stored, {counts['duplicate']} already there")
    print(f"DICOMweb: {base}/dicomweb/studies/{study}/series")
    print(f"Viewer link (\"Voir l'examen\", valid 12 h): {link}")
    return 1 if rejected else 0


# -- db ----------------------------------------------------------------------------------------
def cmd_db_upgrade(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format)
    gateway = Gateway(settings)
    try:
        gateway.index.upgrade()
    finally:
        gateway.close()
    print("index schema is up to date")
    return 0


# -- apikey ------------------------------------------------------------------------------------
def cmd_apikey_create(args: argparse.Namespace) -> int:
    from gateway.apikeys import ApiKeys

    settings = _settings(args)
    configure_logging("WARNING")
    with Gateway(settings) as gateway:
        key = ApiKeys(gateway.index).create(args.name, args.scopes, institution=args.institution)
    print(f"API key {args.name!r} created. Store it now, it is not shown again:", file=sys.stderr)
    print(str(key))
    return 0


def cmd_apikey_list(args: argparse.Namespace) -> int:
    from gateway.apikeys import ApiKeys

    settings = _settings(args)
    configure_logging("WARNING")
    with Gateway(settings) as gateway:
        keys = ApiKeys(gateway.index).list()
    print(f"{'NAME':<24} {'KEY ID':<16} {'STATUS':<8} {'CREATED':<20} SCOPES")
    for k in keys:
        status = "revoked" if k.revoked_at else "active"
        print(f"{k.name:<24} {k.key_id:<16} {status:<8} "
              f"{k.created_at.strftime('%Y-%m-%d %H:%M:%S'):<20} {' '.join(k.scopes)}")
    return 0


def cmd_apikey_revoke(args: argparse.Namespace) -> int:
    from gateway.apikeys import ApiKeys

    settings = _settings(args)
    configure_logging("WARNING")
    with Gateway(settings) as gateway:
        ApiKeys(gateway.index).revoke(args.name)
    print(f"API key {args.name!r} revoked")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-gateway",
        description="DICOM imaging gateway: DIMSE and DICOMweb archive with viewer links.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", metavar="FILE",
                        help="TOML settings file (default: $GATEWAY_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve DIMSE and HTTP until stopped")
    serve.add_argument("--demo", action="store_true",
                       help="let anonymous clients read and write (loopback listeners only)")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("dimse-worker")  # started by `serve` when [dimse] workers > 1
    worker.add_argument("--port", type=int, required=True)
    worker.set_defaults(func=cmd_dimse_worker)

    ingest = sub.add_parser("ingest", help="store DICOM files and folders (recursively)")
    ingest.add_argument("paths", nargs="+", metavar="PATH")
    ingest.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ingest.add_argument("-v", "--verbose", action="store_true", help="log each refusal")
    ingest.set_defaults(func=cmd_ingest)

    demo = sub.add_parser("demo", help="generate and load the sample study")
    demo.set_defaults(func=cmd_demo)

    apikey = sub.add_parser("apikey", help="create, list and revoke API keys (bearer tokens)")
    apikey_sub = apikey.add_subparsers(dest="apikey_command", required=True, metavar="ACTION")
    create = apikey_sub.add_parser("create", help="create a key and print it (once)")
    create.add_argument("--name", required=True, help="a unique name for the key's holder")
    create.add_argument("--scopes", required=True,
                        help="comma-separated: dicomweb:read, dicomweb:write, links:mint, "
                             "audit:read, events:read, policy:write (confidentiality and DSP "
                             "dates), admin")
    create.add_argument("--institution", help="the holder's institution, for the audit trail")
    create.set_defaults(func=cmd_apikey_create)
    listing = apikey_sub.add_parser("list", help="list keys (never their secrets)")
    listing.set_defaults(func=cmd_apikey_list)
    revoke = apikey_sub.add_parser("revoke", help="revoke a key by name or key id")
    revoke.add_argument("name", metavar="NAME_OR_ID")
    revoke.set_defaults(func=cmd_apikey_revoke)

    db = sub.add_parser("db", help="index database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_sub.add_parser("upgrade", help="apply schema migrations")
    from viewer_links.cli import add_parsers as add_link_parsers

    add_link_parsers(sub)  # links mint|revoke|list, viewer install
    upgrade.set_defaults(func=cmd_db_upgrade)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (SettingsError, GatewayError) as exc:
        print(f"dicom-gateway: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
