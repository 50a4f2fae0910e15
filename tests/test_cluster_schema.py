"""Nodes started at once on an empty PostgreSQL database create the schema once (issue 23).

Three real ``dicom-gateway db upgrade`` processes on a database made for the test. To make
them reach the migrations at the same moment, every time, the test holds the lock that
``CREATE TABLE`` takes on the ``public`` schema (an uncommitted ``DROP SCHEMA public``, rolled
back) until all three processes wait on a lock: without the advisory lock of
``Index.upgrade`` each has then found no ``alembic_version`` and goes on to create it, and all
but one fail with a unique violation; with it, one migrates while the others wait for it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, make_url, text

from gateway.index import MIGRATIONS
from tests.support.databases import new_databases

PG_URL = os.environ.get("GATEWAY_TEST_DATABASE_URL", "")
NODES = 3

pytestmark = pytest.mark.skipif(not PG_URL, reason="needs GATEWAY_TEST_DATABASE_URL")


@pytest.fixture
def empty_database() -> Iterator[str]:
    """The URL of a new, empty database on the test server, dropped afterwards."""
    with new_databases("t_cluster") as new:
        yield new()


def _waiting_on_locks(connection: object, database: str) -> int:
    return int(connection.execute(text(  # type: ignore[attr-defined]
        "SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND wait_event_type = 'Lock'"
    ), {"db": database}).scalar_one())


def test_nodes_started_at_once_create_the_schema_once(empty_database: str,
                                                      tmp_path: Path) -> None:
    database = str(make_url(empty_database).database)
    engine = create_engine(empty_database)
    watcher_engine = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    processes: list[subprocess.Popen[str]] = []
    try:
        with engine.connect() as gate:
            gate.execute(text("DROP SCHEMA public"))  # held, uncommitted: CREATE TABLE waits
            for node in range(NODES):
                env = {**os.environ, "GATEWAY_DATABASE_URL": empty_database,
                       "GATEWAY_DATA_DIR": str(tmp_path / f"node{node}"),
                       "GATEWAY_LOG_LEVEL": "WARNING"}
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "gateway", "db", "upgrade"], env=env,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            with watcher_engine.connect() as watcher:
                deadline = time.monotonic() + 120
                while _waiting_on_locks(watcher, database) < NODES:
                    exited = [p.returncode for p in processes if p.poll() is not None]
                    assert not exited, f"a node ended before reaching the schema: {exited}"
                    assert time.monotonic() < deadline, "the nodes never reached the schema"
                    time.sleep(0.05)
            gate.rollback()  # the schema is back: let them all go
        outputs = [p.communicate(timeout=120)[0] for p in processes]
    finally:
        watcher_engine.dispose()
        engine.dispose()
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()

    for p, output in zip(processes, outputs, strict=True):
        assert p.returncode == 0, output
        assert "index schema is up to date" in output
    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    try:
        with engine.connect() as connection:
            versions = connection.execute(text("SELECT version_num FROM alembic_version")).all()
            tables = set(inspect(connection).get_table_names())
    finally:
        engine.dispose()
    assert versions == [(head,)]
    assert {"patient", "study", "series", "instance", "event"} <= tables
