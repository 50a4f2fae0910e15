"""The index's group commit, on the real database: units queued by concurrent callers are
committed together by whichever caller holds the committer; a unit's own failure touches no
other unit (a savepoint each), and a unit without a savepoint fails its whole batch."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, make_url, select
from sqlalchemy.orm import Session

from gateway.index import CHORE_OBJECT_SWEEP, Index
from gateway.models import Patient


@pytest.fixture
def index(database_url: str) -> Iterator[Index]:
    index = Index(database_url)
    index.upgrade()
    yield index
    index.close()


def add_patient(patient_id: str) -> Callable[[Session], str]:
    def work(session: Session) -> str:
        session.execute(insert(Patient).values(patient_id=patient_id))
        return threading.current_thread().name

    return work


def patients(index: Index) -> set[str]:
    with index.Session() as session:
        return set(session.scalars(select(Patient.patient_id)))


def wait_for_queued(index: Index, count: int) -> None:
    deadline = time.monotonic() + 10
    while index._queue.qsize() < count:  # noqa: SLF001 - the units waiting for the committer
        assert time.monotonic() < deadline, "the writers never queued their units"
        time.sleep(0.001)


def test_units_queued_meanwhile_are_committed_together_by_one_caller(index: Index) -> None:
    inside, release = threading.Event(), threading.Event()

    def slow(session: Session) -> str:
        session.execute(insert(Patient).values(patient_id="first"))
        inside.set()
        release.wait(10)
        return threading.current_thread().name

    with ThreadPoolExecutor(3, thread_name_prefix="writer") as pool:
        first = pool.submit(index.write, slow)
        assert inside.wait(10)  # the first caller holds the committer, inside its unit
        second = pool.submit(index.write, add_patient("second"))
        third = pool.submit(index.write, add_patient("third"))
        wait_for_queued(index, 2)
        release.set()
        ran_in = {first.result(), second.result(), third.result()}
    # The two queued units ran in one thread: the caller that led the next batch ran both.
    assert len(ran_in) == 2
    assert patients(index) == {"first", "second", "third"}


def test_a_failing_unit_leaves_the_others_of_its_batch_committed(index: Index) -> None:
    inside, release = threading.Event(), threading.Event()

    def hold(session: Session) -> None:
        inside.set()
        release.wait(10)

    def failing(session: Session) -> None:
        session.execute(insert(Patient).values(patient_id="never"))
        raise ValueError("this unit's own failure")

    with ThreadPoolExecutor(4) as pool:
        holder = pool.submit(index.write, hold)
        assert inside.wait(10)
        ok = [pool.submit(index.write, add_patient(f"p{k}")) for k in range(2)]
        bad = pool.submit(index.write, failing)
        wait_for_queued(index, 3)
        release.set()
        holder.result()
        for future in ok:
            future.result()
        with pytest.raises(ValueError, match="own failure"):
            bad.result()
    assert patients(index) == {"p0", "p1"}


def add_patient_bare(index: Index, patient_id: str) -> Callable[[Any], str]:
    """The same unit on the driver's connection (``Index.write_bare``)."""
    mark = "?" if index.dialect == "sqlite" else "%s"

    def work(driver_connection: Any) -> str:
        cursor = driver_connection.cursor()
        cursor.execute(f"INSERT INTO patient (patient_id, issuer_of_patient_id, patient_name, "
                       f"patient_name_norm, patient_birth_date, patient_sex) "
                       f"VALUES ({mark}, '', '', '', '', '')", (patient_id,))
        cursor.close()
        return threading.current_thread().name

    return work


def test_a_bare_unit_that_fails_fails_its_batch(index: Index) -> None:
    add = add_patient_bare(index, "never")

    def failing(driver_connection: Any) -> None:
        add(driver_connection)
        raise RuntimeError("broken")

    with pytest.raises(RuntimeError, match="broken"):
        index.write_bare(failing)
    assert index.write_bare(add_patient_bare(index, "after"))  # the committer is free again
    assert patients(index) == {"after"}


def test_a_lost_bare_connection_is_replaced(index: Index, database_url: str) -> None:
    """The DBAPI connection kept for bare batches, lost underneath. PostgreSQL (its server
    process terminated, as by a restart): the server was not reached, so the batch runs again
    on a new connection and succeeds, once. SQLite (closed by hand, a programming error): the
    batch fails with the driver's error, the one after runs on a new connection."""
    assert index.write_bare(add_patient_bare(index, "before"))
    kept = index.write_bare(lambda driver_connection: driver_connection)
    if database_url.startswith("postgresql"):
        with index.engine.connect() as other:
            assert other.execute(select(func.pg_terminate_backend(kept.info.backend_pid))).scalar()
        assert index.write_bare(add_patient_bare(index, "lost"))
        expected = {"before", "lost", "after"}
    else:
        kept.close()
        with pytest.raises(Exception, match="closed"):
            index.write_bare(add_patient_bare(index, "lost"))
        expected = {"before", "after"}
    assert index.write_bare(add_patient_bare(index, "after"))
    assert index.write_bare(lambda driver_connection: driver_connection) is not kept
    assert patients(index) == expected


def test_bare_and_isolated_units_in_one_batch(index: Index) -> None:
    inside, release = threading.Event(), threading.Event()

    def hold(session: Session) -> None:
        inside.set()
        release.wait(10)

    with ThreadPoolExecutor(4) as pool:
        holder = pool.submit(index.write, hold)
        assert inside.wait(10)
        bare = pool.submit(index.write_bare, add_patient_bare(index, "bare"))
        isolated = pool.submit(index.write, add_patient("isolated"))
        wait_for_queued(index, 2)
        release.set()
        holder.result()
        assert bare.result() == isolated.result()  # one caller ran both, in one batch
    assert patients(index) == {"bare", "isolated"}


def test_many_concurrent_writers_all_committed(index: Index) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: index.write(add_patient(f"c{k}")) if k % 2
                      else index.write_bare(add_patient_bare(index, f"c{k}")), range(200)))
    with index.Session() as session:
        assert session.scalar(select(func.count()).select_from(Patient)) == 200


LOCK_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("shared", [True, False])
def test_processes_sharing_an_sqlite_file_take_turns_at_the_writer_lock(
        tmp_path: Path, shared: bool) -> None:
    """With ``shared_writer`` a group commit waits while another process holds the writer
    lock (and goes on once it is released); without it, the lock file is not used."""
    database = tmp_path / "index.sqlite"
    index = Index(f"sqlite:///{database}", shared_writer=shared)
    index.upgrade()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, f"{database}.writer"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == "locked\n"
        with ThreadPoolExecutor(1) as pool:
            write = pool.submit(index.write, add_patient("waiting"))
            if shared:
                time.sleep(0.5)
                assert not write.done(), "the commit did not wait for the other process"
                holder.stdin.write("\n")
                holder.stdin.flush()
            write.result(timeout=10)
        assert patients(index) == {"waiting"}
    finally:
        holder.kill()
        holder.communicate()  # closes its pipes
        index.close()


def test_a_writer_lock_file_only_for_a_database_that_is_one_file(database_url: str) -> None:
    index = Index(database_url, shared_writer=True)
    try:
        lock_path = index._writer_lock_path  # noqa: SLF001 - no file to show it otherwise
        if database_url.startswith("postgresql"):  # PostgreSQL has its own writers
            assert lock_path is None
        else:
            assert lock_path == f"{make_url(database_url).database}.writer"
    finally:
        index.close()


# What each kind of write flushes, counted by strace in a child process that ends without
# closing the index (closing checkpoints the log, which flushes it). SQLite flushes a log's
# header itself when it starts the log anew (the child's first write; after a checkpoint): a
# child making that first write only is the baseline.
_WRITES = {
    "ingest": "index.write_bare(add, durable=False); index.write(work, durable=False)",
    "ingest then flush": "index.write_bare(add, durable=False); index.flush()",
    "durable bare": "index.write_bare(add)",
    "durable": "index.write(work)",
}
_CHILD = """
import os, sys
from sqlalchemy import insert
from gateway.index import CHORE_OBJECT_SWEEP, Index
from gateway.models import Patient
index = Index(sys.argv[1])
def add(connection, patient_id="bare"):
    connection.execute("INSERT INTO patient (patient_id, issuer_of_patient_id, patient_name,"
                       " patient_name_norm, patient_birth_date, patient_sex)"
                       " VALUES (?, '', '', '', '', '')", (patient_id,))
def work(session):
    session.execute(insert(Patient).values(patient_id="isolated"))
index.write_bare(lambda connection: add(connection, os.urandom(8).hex()), durable=False)
{writes}
os._exit(0)
"""


def _log_flushes(folder: Path, writes: str) -> list[str]:
    """The flushes of the log of a new database in ``folder`` while a child makes ``writes``."""
    folder.mkdir()
    url = f"sqlite:///{folder / 'index.sqlite'}"
    index = Index(url)
    index.upgrade()
    index.close()
    trace = folder / "trace"
    subprocess.run(["strace", "-f", "-qq", "-y", "-e", "trace=fsync,fdatasync",
                    "-e", "signal=none", "-o", str(trace), sys.executable, "-c",
                    _CHILD.format(writes=writes), url],
                   check=True, timeout=60)
    return [line for line in trace.read_text().splitlines() if "index.sqlite-wal>" in line]


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.parametrize("writes", list(_WRITES))
def test_only_writes_recovery_can_make_again_leave_the_log_unflushed(
        tmp_path: Path, writes: str) -> None:
    """SQLite: an ingest commit (``durable=False``) does not flush the log; :meth:`Index.flush`
    and every other write do, before they return."""
    baseline = _log_flushes(tmp_path / "baseline", "")
    flushes = _log_flushes(tmp_path / "writes", _WRITES[writes])
    assert len(flushes) - len(baseline) == (0 if writes == "ingest" else 1), flushes


def test_a_chore_is_done_by_one_node_at_a_time(index: Index, database_url: str) -> None:
    """``Index.exclusive``: on PostgreSQL a second index (another node) is told no while the
    first holds the chore, and yes once it let go; on SQLite (one node) always yes."""
    other = Index(database_url)
    try:
        with index.exclusive(CHORE_OBJECT_SWEEP) as mine:
            assert mine
            with other.exclusive(CHORE_OBJECT_SWEEP) as theirs:
                assert theirs is (not database_url.startswith("postgresql"))
        with other.exclusive(CHORE_OBJECT_SWEEP) as theirs:
            assert theirs
    finally:
        other.close()
