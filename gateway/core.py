"""The core object every front end is handed: settings, storage, index and ingest, wired once."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from gateway.audit import AuditSink, DatabaseAudit
from gateway.config import Settings, SettingsError
from gateway.errors import (
    Conflict,
    IdentityConflict,
    InstanceRejected,
    InvalidInstance,
    TooLarge,
    Unavailable,
)
from gateway.index import CHORE_OBJECT_SWEEP, Index
from gateway.ingest import Ingestor
from gateway.recovery import RecoveryReader
from gateway.s3 import S3Storage
from gateway.storage import BlobStore, FileStorage, make_private_folders

logger = logging.getLogger(__name__)


@contextmanager
def data_folder_errors(settings: Settings) -> Iterator[None]:
    """Turn a data folder the process cannot create or write into a :class:`SettingsError`
    naming the setting to change (no traceback at start)."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or settings.data_dir
        raise SettingsError(
            f"data folder {settings.data_dir}: cannot use {where}: "
            f"{exc.strerror or exc}; give the gateway's user write access to it, or set "
            f"GATEWAY_DATA_DIR (data_dir) to a folder it may write") from None


@contextmanager
def database_errors(settings: Settings) -> Iterator[None]:
    """Turn an index URL that names no usable database into a :class:`SettingsError` naming
    the setting (the URL shown without its password)."""
    try:
        yield
    except (ArgumentError, NoSuchModuleError, ModuleNotFoundError, DBAPIError,
            Unavailable) as exc:
        try:
            shown = make_url(settings.index_url).render_as_string(hide_password=True)
        except ArgumentError:
            shown = "(not a URL)"
        if isinstance(exc, ModuleNotFoundError):
            reason = (f"its driver is not installed ({exc.name}); for PostgreSQL install "
                      f"the extra: pip install 'dicom-gateway[postgres]'")
        elif isinstance(exc, Unavailable):
            reason = str(exc)
        elif isinstance(exc, DBAPIError):
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        else:
            reason = str(exc).splitlines()[0]
        raise SettingsError(
            f"database {shown}: {reason}; check GATEWAY_DATABASE_URL (database_url), e.g. "
            f"postgresql+psycopg://user@host/db, or leave it unset for SQLite in the data "
            f"folder") from None


def open_storage(settings: Settings, index: Index) -> BlobStore:
    """The blob store the settings name: files in ``<data>/files`` (the default) or an
    S3-compatible bucket (``[storage] url = s3://bucket/prefix``)."""
    storage = settings.storage
    if storage.url and storage.url.startswith("s3:"):
        return S3Storage(storage.url, endpoint_url=storage.s3_endpoint_url,
                         data_dir=settings.data_dir, timeout=storage.s3_timeout_seconds,
                         cache_bytes=storage.cache_bytes,
                         orphan_grace=storage.orphan_grace_seconds,
                         min_free_bytes=storage.min_free_bytes, flush_index=index.flush)
    return FileStorage(settings.data_dir / "files", fsync=storage.fsync,
                       min_free_bytes=storage.min_free_bytes, direct_io=storage.direct_io,
                       flush_index=index.flush)


class Gateway:
    """The transport-free core of one gateway process.

    Call :meth:`open` before use (migrations, crash recovery) and :meth:`close` at the end.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        with data_folder_errors(settings):
            make_private_folders(settings.data_dir)
        with database_errors(settings):
            self.index = Index(settings.index_url, shared_writer=settings.dimse.workers > 1)
        with data_folder_errors(settings):
            self.storage = open_storage(settings, self.index)
        # The access trail (PS3.15 A.5): every front end records through this one sink.
        self.audit: AuditSink = DatabaseAudit(self.index)
        self.ingestor = Ingestor(self.storage, self.index, overwrite=settings.storage.overwrite,
                                 max_inflated_bytes=settings.storage.max_inflated_bytes)

    def open(self, *, recover: bool = True) -> Gateway:
        """Bring the schema up to date and finish or undo writes a crash left behind.

        Only the process that starts first recovers (``recover=False`` in worker processes,
        whose siblings may have writes in flight).
        """
        if recover:
            with database_errors(self.settings):
                self.index.upgrade()
        # Recovery only when no other process (serve, a worker, a CLI command) uses the folder.
        with data_folder_errors(self.settings):
            if isinstance(self.storage, S3Storage):
                # No spool to recover: a write is done when its PUT and commit are. The
                # sweeper runs in the first process only (not in [dimse] workers).
                self.storage.attach(
                    self.index.referenced_files if recover else None,
                    lambda: self.index.exclusive(CHORE_OBJECT_SWEEP))
            elif not isinstance(self.storage, FileStorage):
                raise TypeError(f"unknown blob store {type(self.storage).__name__}")
            elif recover:
                # Each spool file is read in a worker process, within [storage]
                # recovery_file_seconds of CPU: what it cannot read goes to the quarantine
                # folder.
                storage = self.settings.storage
                with RecoveryReader(storage.recovery_file_seconds,
                                    storage.max_inflated_bytes) as reader:
                    self.storage.attach(self.index.has_file, reader.identify, self._restore)
            else:
                self.storage.attach()
        return self

    def _restore(self, path: str) -> bool:
        """Store again an instance found by recovery in a spool file without its index row
        (the row of a write that may have been acknowledged, lost in a power failure);
        ``False`` if it is refused (another instance is stored under its SOP Instance UID, its
        study belongs to another patient, an IOCM rejection note rejected it...)."""
        try:
            self.ingestor.ingest(Path(path).read_bytes(), source="recovery")
        except (Conflict, IdentityConflict, InstanceRejected, InvalidInstance, TooLarge) as exc:
            logger.warning("recovery did not store the instance in %s again: %s", path, exc)
            return False
        return True

    def close(self) -> None:
        self.ingestor.close()
        self.storage.detach()
        self.index.close()

    def __enter__(self) -> Gateway:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
