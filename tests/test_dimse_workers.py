"""Several DIMSE worker processes share the port and the index (``[dimse] workers``)."""

from __future__ import annotations

import threading
from pathlib import Path

from conftest import ct_dataset
from dimse_helpers import associate
from gateway_process import GatewayProcess
from sqlalchemy import create_engine, func, select

from gateway.models import Instance


def test_workers_share_the_port_and_lose_nothing(tmp_path: Path, database_url: str) -> None:
    env = {
        "GATEWAY_DATA_DIR": str(tmp_path / "data"),
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_DIMSE_PORT": "0",
        "GATEWAY_HTTP_PORT": "0",
        "GATEWAY_STORAGE_MIN_FREE_BYTES": "0",
        "GATEWAY_DIMSE_WORKERS": "2",
    }
    process = GatewayProcess(env, tmp_path / "gateway.log").start()
    statuses: list[int] = []

    def send(offset: int) -> None:
        assoc = associate(process.dimse_port, calling=f"SCU{offset}")
        assert assoc.is_established
        for i in range(offset, 40, 4):
            statuses.append(int(assoc.send_c_store(ct_dataset(i)).Status))
        assoc.release()

    try:
        threads = [threading.Thread(target=send, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        # The worker process is serving too.
        assert process.proc is not None
        children = Path(f"/proc/{process.proc.pid}/task/{process.proc.pid}/children")
        assert children.read_text().split(), "no DIMSE worker process was started"
    finally:
        process.stop()
    assert statuses == [0] * 40
    engine = create_engine(database_url)
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(Instance)).scalar() == 40
    engine.dispose()
