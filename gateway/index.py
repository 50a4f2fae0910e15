"""The index: one Engine, one sessionmaker, and the queries the core needs.

SQLite (WAL, foreign keys) by default, PostgreSQL by URL, the same code.
Writes go through a group committer: each caller queues a unit of work; the caller that finds no
commit under way runs all the units waiting at that moment in one transaction (a savepoint each)
and commits once, so many units share one flush of the log (DESIGN.md: "group commits are the
way to speed"). A lone writer commits its own unit in its own thread, with no hand-over to
another.

A unit is durable when its call returns, unless it was queued with ``durable=False``: the
ingest path's rows, whose durability the blob store carries instead. Their instance's content
and its spool name are on stable storage before the row is written, and the spool name is
dropped only after :meth:`Index.flush` (gateway.storage); a row lost with the log's tail in a
power failure is written again by recovery from that spool file. On SQLite such a batch commits
without flushing the log (``synchronous=NORMAL``) and one ``fdatasync`` of the log then covers
every batch committed since; on PostgreSQL every commit is flushed, as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar, cast

from sqlalchemy import (
    Engine,
    Table,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    make_url,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from gateway.errors import IdentityConflict, Unavailable
from gateway.metadata import ParsedInstance
from gateway.models import (
    Base,
    EventCursor,
    Instance,
    Patient,
    RejectedInstance,
    Series,
    Study,
)
from gateway.patients import same_patient
from gateway.storage import PRIVATE_FILE, flush_data

logger = logging.getLogger(__name__)

T = TypeVar("T")
MIGRATIONS = Path(__file__).parent / "migrations"
# How many units of work one group commit takes at most.
MAX_BATCH = 64
# The PostgreSQL advisory lock key the schema's migrations run under (Index.upgrade): any
# fixed 64-bit value no other lock of the database uses ("dicomgw1" in ASCII).
MIGRATION_LOCK = 0x6469636F6D677731


# Advisory locks of the chores one node at a time does (Index.exclusive): (class, chore).
CHORE_LOCK_CLASS = 0x4447  # "DG"
CHORE_OBJECT_SWEEP = 1

# Seconds to wait for a PostgreSQL connection before the request is refused as unavailable.
CONNECT_TIMEOUT_SECONDS = 5


def make_engine(url: str, *, writer: bool = False) -> Engine:
    """Create an Engine, with SQLite's pragmas set on each new connection.

    The ``writer`` engine (used by the group committer) takes SQLite's write lock when a
    transaction begins, so that another process's writer waits instead of failing mid-way.
    """
    if url.startswith("sqlite"):
        _create_private(url)
        # The writer: one connection for SQLAlchemy sessions, one kept for bare batches.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=2 if writer else 8, max_overflow=0 if writer else 16)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy, not pysqlite, decide when transactions begin (savepoints work).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # The writer's commits do not flush the log themselves: the committer flushes it
            # after a batch holding a durable unit (Index.flush), and the ingest path's
            # batches are flushed later, for many at once (readers write nothing).
            cursor.execute("PRAGMA synchronous=NORMAL" if writer else "PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

        return engine
    engine = create_engine(url, pool_size=3 if writer else 10,
                           max_overflow=0 if writer else 20, pool_pre_ping=True,
                           connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS})

    @event.listens_for(engine, "handle_error")
    def _unavailable(context: Any) -> BaseException | None:
        """A database that cannot be reached is :class:`Unavailable` (C-STORE 0xA700,
        HTTP 503), not an internal error; the pool reconnects once it is back."""
        if context.is_disconnect:
            return unavailable(context.original_exception, force=True)
        return unavailable(context.original_exception)

    return engine


def unavailable(exc: BaseException, *, force: bool = False) -> Unavailable | None:
    """The :class:`Unavailable` an error of the database driver stands for, if it says the
    server cannot be reached: a PEP 249 ``OperationalError`` without an SQLSTATE (no answer
    at all), or of class 08 (connection exception) or 57P (the server shutting down)."""
    if isinstance(exc, Unavailable):
        return exc
    if isinstance(exc, OperationalError):  # SQLAlchemy's wrapper: judge the driver's error
        exc = exc.orig or exc
        force = force or bool(getattr(exc, "connection_invalidated", False))
    state = getattr(exc, "sqlstate", None)
    operational = any(cls.__name__ == "OperationalError" for cls in type(exc).__mro__)
    if type(exc).__module__ == "sqlite3":  # no SQLSTATE: a file locked past the busy timeout
        operational = operational and ("locked" in str(exc) or "unable to open" in str(exc))
    if not force and not (operational and (state is None or state.startswith(("08", "57P")))):
        return None
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return Unavailable(f"the index database did not answer ({reason[:160]}); nothing was "
                       "changed, try again later")


def _create_private(url: str) -> None:
    """Create an SQLite database file readable by the gateway's user only (0600) before
    SQLite opens it: SQLite would create it 0644 under the usual umask, and gives its ``-wal``
    and ``-shm`` files the mode of the database file."""
    parsed = make_url(url)
    if parsed.database in (None, "", ":memory:") or parsed.database.startswith("file:"):
        return
    try:
        os.close(os.open(parsed.database, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         PRIVATE_FILE))
    except FileExistsError:
        pass


def _writer_lock_path(url: str) -> str | None:
    """The file whose lock the writers of an SQLite database share; ``None`` for a database
    that is not one file (PostgreSQL, SQLite in memory)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return f"{parsed.database}.writer"


def _log_path(url: str) -> str | None:
    """The write-ahead log of an SQLite database file; ``None`` for any other database."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return f"{parsed.database}-wal"


def _insert(dialect: str, table: Any) -> Any:
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


_instance = cast(Table, Instance.__table__)
_series = cast(Table, Series.__table__)
_study = cast(Table, Study.__table__)
_patient = cast(Table, Patient.__table__)
# A series' row with the identity of its study and patient (the wrong-patient guard).
_SERIES_BY_UID = (
    select(_series.c.pk, _series.c.study_pk, _study.c.study_instance_uid,
           _patient.c.patient_id, _patient.c.issuer_of_patient_id)
    .join(_study, _study.c.pk == _series.c.study_pk)
    .join(_patient, _patient.c.pk == _study.c.patient_pk)
    .where(_series.c.series_instance_uid == bindparam("uid")))
_STUDY_PATIENT = (
    select(_patient.c.patient_id, _patient.c.issuer_of_patient_id, _study.c.patient_pk)
    .join(_study, _study.c.patient_pk == _patient.c.pk)
    .where(_study.c.study_instance_uid == bindparam("uid")))
_INSERT_INSTANCE = insert(_instance)
# A study's modalities, and the time its row last changed, when a series is added to it.
_STUDY_NEW_SERIES = (
    update(_study).where(_study.c.pk == bindparam("study_pk"))
    .values(modalities_in_study=bindparam("modalities"), updated_at=bindparam("stamp"))
)
_STUDY_MODALITIES = select(_series.c.modality).where(
    _series.c.study_pk == bindparam("study_pk")).distinct()


def now() -> datetime:
    return datetime.now(UTC)


class _Result(Generic[T]):
    """What a unit's work returned or raised, set by the committing thread.

    The threads waiting for a group commit wait on the committer's lock, never on this, so
    it needs none of :class:`concurrent.futures.Future`'s locking.
    """

    __slots__ = ("_done", "_value", "_error")

    def __init__(self) -> None:
        self._done = False
        self._value: T | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._done

    def set_result(self, value: T) -> None:
        self._value, self._done = value, True

    def set_exception(self, error: BaseException) -> None:
        self._error, self._done = error, True

    def result(self) -> T:
        if self._error is not None:
            raise self._error
        return cast(T, self._value)


class _Unit(NamedTuple):
    """A unit of work waiting for the group commit."""

    work: Callable[[Any], Any]  # a Session, or a DBAPI connection for a bare unit
    future: _Result[Any]
    isolated: bool
    durable: bool  # flushed before its call returns (else by a later Index.flush)


# The columns of an instance row written by the C-STORE hot path, in order.
_NEW_INSTANCE_COLUMNS = (
    "series_pk", "sop_instance_uid", "sop_class_uid", "instance_number", "transfer_syntax_uid",
    "rows", "columns", "bits_allocated", "number_of_frames", "file_path", "file_size", "digest",
    "metadata_json", "source", "created_at",
)


class _DriverStatements:
    """The statements of the C-STORE hot path, as the database driver's own SQL.

    Executed on the driver's cursor of the writer's connection: a statement in a few
    microseconds, where building and running it through SQLAlchemy costs ~0.1 ms of
    interpreter time.
    """

    def __init__(self, dialect: Any) -> None:
        mark = "?" if dialect.name == "sqlite" else "%s"
        quote = dialect.identifier_preparer.quote
        columns = ", ".join(quote(c) for c in _NEW_INSTANCE_COLUMNS)
        marks = ", ".join([mark] * (len(_NEW_INSTANCE_COLUMNS) - 1))  # series_pk selected
        # The series' row found by its UID inside the insert: nothing inserted (rowcount 0)
        # when the series is not indexed, the SOP Instance UID is taken or rejected, or the
        # series belongs to another study or patient.
        # Only into a series of the instance's own study and patient (else the checks of
        # Index.add_instance refuse it), and never an instance an IOCM note rejected.
        self.insert_instance = (
            f"INSERT INTO instance ({columns}) SELECT series.pk, {marks} FROM series "
            f"JOIN study ON study.pk = series.study_pk "
            f"JOIN patient ON patient.pk = study.patient_pk "
            f"WHERE series.series_instance_uid = {mark} AND study.study_instance_uid = {mark} "
            f"AND patient.patient_id = {mark} AND (patient.issuer_of_patient_id = {mark} "
            f"OR patient.issuer_of_patient_id = '' OR {mark} = '') "
            f"AND NOT EXISTS (SELECT 1 FROM rejected_instance WHERE sop_instance_uid = {mark}) "
            f"ON CONFLICT (sop_instance_uid) DO NOTHING")
        # How SQLAlchemy stores a timestamp on this database (a string on SQLite).
        processor = _instance.c.created_at.type.dialect_impl(dialect).bind_processor(dialect)
        self.stamp: Callable[[datetime], Any] = processor or (lambda value: value)


class Index:
    """The SQL index of patients, studies, series and instances.

    Parameters
    ----------
    url
        SQLAlchemy URL (``sqlite:///...`` or ``postgresql+psycopg://...``).
    shared_writer
        Other processes write to the same SQLite file at the same time (``[dimse] workers``
        above 1): each group commit first takes a lock on ``<database>.writer`` (``flock``), so
        that the processes' writers take turns at once. Without it, a writer finding SQLite's
        lock taken sleeps in SQLite's busy handler (1 ms, then 2, 5, 10...), and four worker
        processes stored fewer instances per second than one (docs/benchmarks.md).
    """

    def __init__(self, url: str, *, shared_writer: bool = False) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        self.Session = sessionmaker(self.engine, expire_on_commit=False)
        self.write_engine = make_engine(url, writer=True)
        self._driver = _DriverStatements(self.write_engine.dialect)
        self.WriteSession = sessionmaker(self.write_engine, expire_on_commit=False)
        self._queue: queue.SimpleQueue[_Unit] = queue.SimpleQueue()
        # Held by the caller committing a batch; the others wait for it, then find their unit
        # committed or lead the next batch.
        self._committer = threading.Lock()
        self._bare_connection: Any = None  # the writer's DBAPI connection for bare batches
        self._writer_lock_path = _writer_lock_path(url) if shared_writer else None
        self._writer_lock_fd = -1 if self._writer_lock_path is None else os.open(
            self._writer_lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._log_path = _log_path(url)

    # -- schema -------------------------------------------------------------------------------
    def upgrade(self) -> None:
        """Bring the schema to the newest Alembic revision (``dicom-gateway db upgrade``).

        On PostgreSQL the migrations run under a transaction-level advisory lock
        (:data:`MIGRATION_LOCK`), taken on Alembic's own connection before it reads the
        schema's revision and released when that transaction ends: of several nodes started
        at once on the same database, one migrates and the others, waiting, then find the
        schema at the newest revision and change nothing. (Without it each created
        ``alembic_version`` and all but one failed.) SQLite needs none: its writer takes the
        database's write lock when the transaction begins.
        """
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        with self.write_engine.begin() as connection:
            if self.dialect == "postgresql":
                connection.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK)))
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        self.flush()

    def close(self) -> None:
        with self._committer:  # a commit under way ends first
            if self._bare_connection is not None:
                self._bare_connection.close()
                self._bare_connection = None
            self.engine.dispose()
            if self._writer_lock_fd >= 0:
                os.close(self._writer_lock_fd)
                self._writer_lock_fd = -1
        self.write_engine.dispose()

    # -- group commit -------------------------------------------------------------------------
    def write(self, work: Callable[[Session], T], *, durable: bool = True) -> T:
        """Run ``work(session)`` in a committed transaction shared with concurrent writers.

        Returns only after the transaction holding ``work`` is committed, and flushed to
        stable storage unless ``durable`` is false (then :meth:`flush` does it: for a write
        that can be made again after a power failure, as recovery does an instance's row);
        raises what ``work`` raised (its savepoint rolled back, the others unaffected) or the
        commit's error.
        """
        future: _Result[T] = _Result()
        return self._write(_Unit(work, future, True, durable), future)

    def write_bare(self, work: Callable[[Any], T], *, durable: bool = True) -> T:
        """Run ``work(driver_connection)`` in a committed transaction, without SQLAlchemy.

        For a unit that cannot fail but with the transaction (the C-STORE hot path): no
        savepoint of its own, and a batch made only of such units runs on a DBAPI connection
        kept for them, with no session; in a busy process each statement and each layer
        SQLAlchemy adds is one more wait for the interpreter lock inside the committer. If
        ``work`` raises all the same, its whole batch fails with its error. ``durable`` as
        for :meth:`write`.
        """
        future: _Result[T] = _Result()
        return self._write(_Unit(work, future, False, durable), future)

    def flush(self) -> None:
        """Put every transaction committed so far on stable storage.

        On SQLite, one ``fdatasync`` of the write-ahead log, whichever process or connection
        wrote it (a log that is gone was checkpointed into the database file, and that file
        flushed, by SQLite). PostgreSQL flushes each commit itself: nothing to do.

        Raises
        ------
        OSError
            The flush failed (``EIO``): what was committed may not survive a power failure.
        """
        if self._log_path is None:
            return
        try:
            fd = os.open(self._log_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            flush_data(fd)
        finally:
            os.close(fd)

    def _write(self, unit: _Unit, future: _Result[T]) -> T:
        self._queue.put(unit)
        try:
            with self._committer:
                while not future.done():
                    batch = self._waiting_units()
                    if not batch:  # cannot happen: the unit was queued before the lock
                        raise RuntimeError("an index write left the queue uncommitted")
                    self._run_batch(batch)
            return future.result()
        except Exception as exc:
            down = unavailable(exc)
            if down is None or down is exc:
                raise
            raise down from exc

    def _waiting_units(self) -> list[_Unit]:
        batch: list[_Unit] = []
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run_batch(self, batch: list[_Unit]) -> None:
        try:
            with self._across_processes():
                self._commit_batch(batch)
            if any(unit.durable for unit in batch):
                self._flush_for(batch)
        finally:
            for unit in batch:
                if not unit.future.done():  # interrupted (KeyboardInterrupt, SystemExit)
                    unit.future.set_exception(RuntimeError("the index write was interrupted"))

    def _flush_for(self, batch: list[_Unit]) -> None:
        """Flush a committed batch that holds a durable unit; if the flush fails, its durable
        units fail with it (their transaction may be lost), the others stand."""
        try:
            self.flush()
        except OSError as exc:
            logger.error("cannot flush the index's log after a commit: %s", exc.strerror)
            for unit in batch:
                if unit.durable:
                    unit.future.set_exception(exc)

    @contextlib.contextmanager
    def _across_processes(self) -> Iterator[None]:
        """Hold the writer lock shared with other processes, if there is one."""
        if self._writer_lock_fd < 0:
            yield
            return
        fcntl.flock(self._writer_lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._writer_lock_fd, fcntl.LOCK_UN)

    def _commit_batch(self, batch: list[_Unit]) -> None:
        results: list[tuple[_Result[Any], bool, Any]] = []
        bare = [unit for unit in batch if not unit.isolated]
        isolated = [unit for unit in batch if unit.isolated]
        if not isolated:
            self._commit_bare(bare)
            return
        try:
            with self.WriteSession() as session:
                with session.begin():
                    if bare:
                        driver_connection = session.connection().connection.driver_connection
                        for unit in bare:
                            results.append((unit.future, True, unit.work(driver_connection)))
                    if len(isolated) == 1 and not bare:
                        # Alone: no savepoint needed; a failure rolls the transaction back.
                        unit = isolated[0]
                        results.append((unit.future, True, unit.work(session)))
                    else:
                        for unit in isolated:
                            try:
                                with session.begin_nested():
                                    results.append((unit.future, True, unit.work(session)))
                            except Exception as exc:  # the unit's own failure
                                results.append((unit.future, False, exc))
        except Exception as exc:
            if len(batch) > 1 or results:  # the commit failed, not one unit's own work
                logger.exception("index commit failed for %d writes", len(batch))
            for unit in batch:
                if not unit.future.done():
                    unit.future.set_exception(exc)
            return
        for future, ok, value in results:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def _commit_bare(self, batch: list[_Unit]) -> None:
        """Commit units that need no savepoint on the DBAPI connection kept for them.

        The kept connection may have died while idle (the database restarted): a failure to
        reach the server before the commit was sent (nothing can have been written) is tried
        once more on a new connection, so the first write after an outage does not fail.
        """
        for attempt in (1, 2):
            if self._bare_connection is None:
                self._bare_connection = self.write_engine.raw_connection()
            connection = self._bare_connection
            driver_connection = connection.driver_connection
            committing = False
            try:
                if self.dialect == "sqlite":  # autocommit mode: SQLAlchemy's BEGIN, by hand
                    driver_connection.execute("BEGIN IMMEDIATE")
                results = [unit.work(driver_connection) for unit in batch]
                committing = True
                driver_connection.commit()
            except Exception as exc:
                down = unavailable(exc) is not None
                if down:  # the connection is gone: a new one next time
                    connection.invalidate()
                    self._bare_connection = None
                    if attempt == 1 and not committing:
                        continue
                logger.exception("index commit failed for %d writes", len(batch))
                if not down:
                    try:
                        driver_connection.rollback()
                    except Exception:  # the connection itself is gone
                        connection.invalidate()
                        self._bare_connection = None
                for unit in batch:
                    unit.future.set_exception(exc)
                return
            for unit, result in zip(batch, results, strict=True):
                unit.future.set_result(result)
            return

    # -- instances ----------------------------------------------------------------------------
    def find_instance(self, sop_instance_uid: str) -> Instance | None:
        with self.Session() as session:
            return session.scalars(
                select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
            ).one_or_none()

    def find_digest(self, sop_instance_uid: str) -> str | None:
        """The stored digest of an instance, or ``None`` (a cheap existence check)."""
        with self.engine.connect() as connection:
            return connection.execute(
                select(Instance.digest).where(Instance.sop_instance_uid == sop_instance_uid)
            ).scalar()

    def has_file(self, relpath: str) -> bool:
        with self.Session() as session:
            count = session.scalar(
                select(func.count()).select_from(Instance).where(Instance.file_path == relpath)
            )
            return bool(count)

    def referenced_files(self, relpaths: list[str]) -> set[str]:
        """Those of ``relpaths`` that a row names: a stored instance's or a rejected one's whose
        file is kept (the object sweeper keeps them)."""
        if not relpaths:
            return set()
        with self.engine.connect() as connection:
            found = set(connection.scalars(
                select(Instance.file_path).where(Instance.file_path.in_(relpaths))))
            found.update(p for p in connection.scalars(
                select(RejectedInstance.file_path).where(
                    RejectedInstance.file_path.in_(relpaths))) if p)
        return found

    def file_paths(self) -> set[str]:
        with self.Session() as session:
            return set(session.scalars(select(Instance.file_path)))

    def add_new_instance(self, driver_connection: Any, parsed: ParsedInstance, relpath: str,
                         source: str, metadata_json: str) -> bool:
        """Insert an instance of a known series whose SOP Instance UID is not stored yet.

        The common case of every C-STORE, in one driver statement that writes the instance's
        row and nothing else (runs inside :meth:`write_bare`; no count is kept in the series
        and study rows, see :meth:`refresh_study`). Returns ``False``, having changed nothing,
        when the series is not indexed yet or the SOP Instance UID is taken:
        :meth:`add_instance` and the caller's checks take over.
        """
        cursor = driver_connection.cursor()
        try:
            cursor.execute(self._driver.insert_instance,
                           self.new_instance_parameters(parsed, relpath, source, metadata_json))
            return bool(cursor.rowcount == 1)
        finally:
            cursor.close()

    def new_instance_parameters(self, parsed: ParsedInstance, relpath: str, source: str,
                                metadata_json: str) -> tuple[Any, ...]:
        """The parameters of :meth:`add_new_instance`'s statement (:attr:`insert_new_instance`)
        for one instance: a bulk loader (bench/scale.py) runs it for many at once."""
        f = parsed.fields
        return (
            parsed.sop_instance_uid, parsed.sop_class_uid, f["instance_number"],
            parsed.transfer_syntax_uid, f["rows"], f["columns"], f["bits_allocated"],
            f["number_of_frames"], relpath, parsed.size, parsed.digest, metadata_json,
            source[:200], self._driver.stamp(now()), parsed.series_instance_uid,
            parsed.study_instance_uid, f["patient_id"], f["issuer_of_patient_id"],
            f["issuer_of_patient_id"], parsed.sop_instance_uid,
        )

    @property
    def insert_new_instance(self) -> str:
        """The driver statement of :meth:`add_new_instance` (the writer's paramstyle)."""
        return str(self._driver.insert_instance)

    def add_instance(self, session: Session, parsed: ParsedInstance, relpath: str,
                     source: str, metadata_json: str) -> None:
        """Insert one instance, creating its patient, study and series rows as needed.

        Runs inside :meth:`write`. Raises ``IntegrityError`` if the SOP Instance UID is taken.
        """
        stamp = now()
        known = session.connection().execute(
            _SERIES_BY_UID, {"uid": parsed.series_instance_uid}).first()
        if known is not None:
            series_pk, study_pk, study_uid, patient_id, issuer = known
            if study_uid != parsed.study_instance_uid:
                raise IdentityConflict(
                    f"series of another study: series {parsed.series_instance_uid} is stored "
                    f"under study {study_uid}, not under study {parsed.study_instance_uid} as "
                    "this instance says; nothing was stored", study_uid=study_uid,
                    owner=(patient_id, issuer))
            self._check_patient(parsed, patient_id, issuer)
            new_series = False
        else:
            stored = session.connection().execute(
                _STUDY_PATIENT, {"uid": parsed.study_instance_uid}).first()
            patient_pk = None
            if stored is not None:
                self._check_patient(parsed, stored.patient_id, stored.issuer_of_patient_id)
                patient_pk = stored.patient_pk
            study_pk, series_pk, new_series = self._add_series(session, parsed, stamp,
                                                               patient_pk)
        self._add_instance_row(session, parsed, series_pk, study_pk, new_series, relpath, source,
                               metadata_json, stamp)

    @staticmethod
    def _check_patient(parsed: ParsedInstance, patient_id: str, issuer: str) -> None:
        """Refuse an instance whose patient is not the patient of the study it names.

        The message names neither patient's ID: it goes back to the sender.
        """
        f = parsed.fields
        if not same_patient(patient_id, issuer, f["patient_id"], f["issuer_of_patient_id"]):
            raise IdentityConflict(
                "study of another patient: the PatientID / IssuerOfPatientID stored for study "
                f"{parsed.study_instance_uid} differ from this instance's; an instance never "
                "joins another patient's study, nothing was stored",
                study_uid=parsed.study_instance_uid, owner=(patient_id, issuer))

    def _add_series(self, session: Session, parsed: ParsedInstance, stamp: datetime,
                    patient_pk: int | None = None) -> tuple[int, int, bool]:
        """Create the patient, study and series rows of a new series as needed
        (``patient_pk``: the patient of a study already stored)."""
        f = parsed.fields
        if patient_pk is None:
            patient_pk = self._upsert(
                session, Patient,
                {"patient_id": f["patient_id"],
                 "issuer_of_patient_id": f["issuer_of_patient_id"]},
                lambda: {k: f[k] for k in ("patient_name", "patient_name_norm",
                                           "patient_birth_date", "patient_sex")},
            )[0]
        study_pk, _ = self._upsert(
            session, Study, {"study_instance_uid": parsed.study_instance_uid},
            lambda: {
                "patient_pk": patient_pk, "created_at": stamp, "updated_at": stamp,
                "attributes": parsed.study_attributes_json(),
                **{k: f[k] for k in ("study_date", "study_time", "accession_number", "study_id",
                                     "study_description", "referring_physician_name",
                                     "referring_physician_name_norm", "timezone_offset")},
            },
        )
        series_pk, new_series = self._upsert(
            session, Series, {"series_instance_uid": parsed.series_instance_uid},
            lambda: {
                "study_pk": study_pk, "created_at": stamp,
                "attributes": parsed.series_attributes_json(),
                **{k: f[k] for k in ("modality", "series_number", "series_description",
                                     "body_part_examined", "performed_procedure_step_start_date",
                                     "performed_procedure_step_start_time", "series_date",
                                     "series_time")},
            },
        )
        return study_pk, series_pk, new_series

    def _add_instance_row(self, session: Session, parsed: ParsedInstance, series_pk: int,
                          study_pk: int, new_series: bool, relpath: str, source: str,
                          metadata_json: str, stamp: datetime) -> None:
        f = parsed.fields
        connection = session.connection()
        # Prebuilt Core statements on the tables: the hot path of every C-STORE.
        connection.execute(_INSERT_INSTANCE, {
            "series_pk": series_pk,
            "sop_instance_uid": parsed.sop_instance_uid,
            "sop_class_uid": parsed.sop_class_uid,
            "instance_number": f["instance_number"],
            "transfer_syntax_uid": parsed.transfer_syntax_uid,
            "rows": f["rows"], "columns": f["columns"], "bits_allocated": f["bits_allocated"],
            "number_of_frames": f["number_of_frames"],
            "file_path": relpath, "file_size": parsed.size, "digest": parsed.digest,
            "metadata_json": metadata_json, "source": source[:200], "created_at": stamp,
        })
        if not new_series:
            return
        modalities = set(connection.execute(_STUDY_MODALITIES, {"study_pk": study_pk}).scalars())
        connection.execute(_STUDY_NEW_SERIES, {
            "study_pk": study_pk, "stamp": stamp,
            "modalities": "\\".join(sorted(m for m in modalities if m)),
        })

    def _upsert(self, session: Session, model: Any, key: dict[str, Any],
                values: Callable[[], dict[str, Any]]) -> tuple[int, bool]:
        """Insert the row unless its key exists; return its pk and whether it was new."""
        table = model.__table__
        conditions = [table.c[k] == v for k, v in key.items()]
        pk = session.scalar(select(table.c.pk).where(*conditions))
        if pk is not None:
            return pk, False
        stmt = _insert(self.dialect, table).values(**key, **values()).on_conflict_do_nothing()
        result = session.execute(stmt.returning(table.c.pk))
        pk = result.scalar()
        if pk is not None:
            return pk, True
        existing = session.scalar(select(table.c.pk).where(*conditions))
        if existing is None:
            raise RuntimeError(f"{table.name} row vanished during insert")  # cannot happen
        return existing, False

    def remove_instances(self, session: Session, instance_pks: Iterable[int]) -> list[str]:
        """Delete instances; drop series, studies, patients left empty.

        Returns the relative paths of the files to delete once committed.
        """
        pks = list(instance_pks)
        if not pks:
            return []
        rows = session.execute(
            select(Instance.pk, Instance.file_path, Instance.series_pk).where(Instance.pk.in_(pks))
        ).all()
        paths = [r.file_path for r in rows]
        series_pks = {r.series_pk for r in rows}
        session.execute(delete(Instance).where(Instance.pk.in_(pks)))
        if self.dialect == "sqlite":
            # SQLite gives the largest key again once it is deleted: the event scan's cursor
            # (gateway.events) goes back to the largest key left, so it reads such a row.
            largest = select(func.coalesce(func.max(Instance.pk), 0)).scalar_subquery()
            session.execute(update(EventCursor).where(
                EventCursor.name == "instances", EventCursor.value > largest)
                .values(value=largest))
        for series_pk in series_pks:
            self._refresh_series(session, series_pk)
        return paths

    def _refresh_series(self, session: Session, series_pk: int) -> None:
        """Drop a series left without instances, then see to its study."""
        study_pk = session.scalar(select(Series.study_pk).where(Series.pk == series_pk))
        if not session.scalar(select(exists().where(Instance.series_pk == series_pk))):
            session.execute(delete(Series).where(Series.pk == series_pk))
            self.refresh_study(session, study_pk)

    def refresh_study(self, session: Session, study_pk: int | None) -> None:
        """Recompute a study's modalities; drop it (and its patient) if it has no series left.

        Its series and instances are counted when asked for (``gateway.query``): no count is
        kept in the rows, so that storing an instance writes the instance's row and nothing
        else.
        """
        if study_pk is None:
            return
        modalities = session.scalars(
            select(Series.modality).where(Series.study_pk == study_pk)).all()
        if modalities:
            session.execute(update(Study).where(Study.pk == study_pk).values(
                modalities_in_study="\\".join(sorted({m for m in modalities if m})),
                updated_at=now(),
            ))
            return
        patient_pk = session.scalar(select(Study.patient_pk).where(Study.pk == study_pk))
        session.execute(delete(Study).where(Study.pk == study_pk))
        if patient_pk is not None and not session.scalar(
            select(func.count()).where(Study.patient_pk == patient_pk)
        ):
            session.execute(delete(Patient).where(Patient.pk == patient_pk))

    def counts(self) -> dict[str, int]:
        with self.Session() as session:
            return {
                name: session.scalar(select(func.count()).select_from(model)) or 0
                for name, model in (("patients", Patient), ("studies", Study),
                                    ("series", Series), ("instances", Instance))
            }

    def ping(self) -> None:
        """Raise if the database cannot be reached (``/readyz``)."""
        with self.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")

    @contextlib.contextmanager
    def exclusive(self, chore: int) -> Iterator[bool]:
        """Whether this process may do ``chore`` (one of the ``CHORE_*`` numbers) now, no
        other node doing it: a PostgreSQL session advisory lock taken without waiting, held
        for the ``with`` block. On SQLite (one node) always ``True``."""
        if self.dialect != "postgresql":
            yield True
            return
        with self.engine.connect() as connection:
            taken = bool(connection.execute(select(func.pg_try_advisory_lock(
                CHORE_LOCK_CLASS, chore))).scalar())
            connection.commit()
            try:
                yield taken
            finally:
                if taken:
                    connection.execute(select(func.pg_advisory_unlock(CHORE_LOCK_CLASS, chore)))
                    connection.commit()


__all__ = ["Base", "Index", "make_engine"]
