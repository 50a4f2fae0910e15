"""Crash safety: SIGKILL while instances are being stored loses nothing acknowledged.

After a restart every instance that got a success status is indexed and readable, and no file
or row is left without its counterpart (DESIGN.md, "No data lost").
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from gateway.config import load_settings
from gateway.core import Gateway
from gateway.metadata import dataset_offset
from gateway.models import Instance, Series, Study
from tests.support.common import ct_dataset, only_ready_spool_files, study_counts
from tests.support.gateway_process import GatewayProcess

pytestmark = pytest.mark.slow
TOTAL = 400


def _sender(port: int, acknowledged: list[str], stop: threading.Event, offset: int) -> None:
    ae = AE(ae_title=f"CRASH{offset}")
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGW")
    if not assoc.is_established:
        return
    try:
        for i in range(offset, TOTAL, 2):
            if stop.is_set():
                break
            ds = ct_dataset(i, rows=128)
            try:
                status = assoc.send_c_store(ds)
            except Exception:
                break
            if status and status.get("Status") == 0x0000:
                acknowledged.append(ds.SOPInstanceUID)
            elif not status:
                break
    finally:
        if assoc.is_established:
            assoc.abort()
        # The peer died mid-association: close our end ourselves.
        transport = assoc.dul.socket
        if transport is not None and transport.socket is not None:
            transport.close()


def test_sigkill_during_stores_loses_nothing_acknowledged(
    tmp_path: Path, database_url: str
) -> None:
    env = {
        "GATEWAY_DATA_DIR": str(tmp_path / "data"),
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_DIMSE_PORT": "0",
        "GATEWAY_HTTP_PORT": "0",
        "GATEWAY_STORAGE_MIN_FREE_BYTES": "0",
    }
    process = GatewayProcess(env, tmp_path / "gateway.log").start()
    acknowledged: list[str] = []
    stop = threading.Event()
    senders = [threading.Thread(target=_sender,
                                args=(process.dimse_port, acknowledged, stop, k))
               for k in range(2)]
    for sender in senders:
        sender.start()
    deadline = time.monotonic() + 120
    while len(acknowledged) < 60 and time.monotonic() < deadline:
        time.sleep(0.01)
    process.kill()
    stop.set()
    for sender in senders:
        sender.join(timeout=30)
    assert 60 <= len(acknowledged) < TOTAL, "the kill must land while stores are running"

    # Restart: recovery runs when the gateway opens.
    restarted = GatewayProcess(env, tmp_path / "gateway.log").start()
    restarted.stop()

    settings = load_settings(environ=env)
    with Gateway(settings) as gateway:
        with gateway.index.Session() as session:
            rows = {r.sop_instance_uid: r for r in session.scalars(select(Instance))}
            study = session.scalars(select(Study)).one()
            series = session.scalars(select(Series)).all()
        # Every acknowledged instance is indexed and its file is intact.
        for uid in acknowledged:
            assert uid in rows, f"acknowledged instance {uid} lost"
            path = gateway.storage.path(rows[uid].file_path)
            data = path.read_bytes()
            assert hashlib.sha256(data[dataset_offset(data):]).hexdigest() == rows[uid].digest
            assert dcmread(path).SOPInstanceUID == uid
        # No orphan file, no orphan row, no journal left.
        on_disk = {
            str(p.relative_to(gateway.storage.root))
            for p in gateway.storage.root.rglob("*.dcm")
            if ".incoming" not in p.parts
        }
        assert on_disk == {r.file_path for r in rows.values()}
        assert only_ready_spool_files(gateway.storage.incoming)
        # The counts a query returns are those of the rows that exist.
        assert study_counts(gateway, study.study_instance_uid)[:2] == (len(series), len(rows))
