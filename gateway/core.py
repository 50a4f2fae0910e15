"""The core object every front end is handed: settings, storage, index and ingest, wired once."""

from __future__ import annotations

import logging
from pathlib import Path

from gateway.audit import AuditSink, DatabaseAudit
from gateway.config import Settings
from gateway.errors import (
    Conflict,
    IdentityConflict,
    InstanceRejected,
    InvalidInstance,
    TooLarge,
)
from gateway.index import Index
from gateway.ingest import Ingestor
from gateway.recovery import RecoveryReader
from gateway.storage import FileStorage, make_private_folders

logger = logging.getLogger(__name__)


class Gateway:
    """The transport-free core of one gateway process.

    Call :meth:`open` before use (migrations, crash recovery) and :meth:`close` at the end.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        make_private_folders(settings.data_dir)
        self.index = Index(settings.index_url, shared_writer=settings.dimse.workers > 1)
        self.storage = FileStorage(
            settings.data_dir / "files",
            fsync=settings.storage.fsync,
            min_free_bytes=settings.storage.min_free_bytes,
            direct_io=settings.storage.direct_io,
            flush_index=self.index.flush,
        )
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
            self.index.upgrade()
        # Recovery only when no other process (serve, a worker, a CLI command) uses the folder.
        if recover:
            # Each spool file is read in a worker process, within [storage]
            # recovery_file_seconds of CPU: what it cannot read goes to the quarantine folder.
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
