"""The index's database going away and coming back, through a real network path to the real
PostgreSQL (a TCP forwarder the test cuts): refusals that say so, within seconds, and service
again without a restart."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text

from gateway.core import Gateway
from tests.support.common import LiveServer, ct_dataset, make_settings, part10
from tests.support.dicomweb_helpers import api_key, multipart_body, raw
from tests.support.dimse_helpers import associate, wait_until
from tests.support.tcp_proxy import TcpProxy

PG_URL = os.environ.get("GATEWAY_TEST_DATABASE_URL", "")
pytestmark = pytest.mark.skipif(not PG_URL, reason="needs PostgreSQL (GATEWAY_TEST_DATABASE_URL)")

STUDY = "1.2.826.0.1.3680043.8.498.8101"


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[LiveServer, TcpProxy]]:
    """A live gateway whose index is a schema of its own on PostgreSQL, reached through a
    :class:`TcpProxy` (the outage is of a database server: PostgreSQL only)."""
    schema = f"t_{secrets.token_hex(6)}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(PG_URL)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    through = url.set(host="127.0.0.1", port=proxy.port).update_query_dict(
        {"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    gateway = Gateway(make_settings(tmp_path, through)).open()
    try:
        with LiveServer(gateway) as live:
            yield live, proxy
    finally:
        proxy.restore() if proxy.down else None
        gateway.close()
        proxy.close()
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _readyz(live: LiveServer) -> int:
    return raw(f"{live.http_url}/readyz").status


def test_database_down_is_refused_then_recovered(proxied: tuple[LiveServer, TcpProxy]) -> None:
    live, proxy = proxied
    token = api_key(live.gateway, "writer", "dicomweb:read,dicomweb:write")
    assoc = associate(live.dimse_port)
    assert int(assoc.send_c_store(ct_dataset(0, study=STUDY)).Status) == 0
    assoc.release()

    proxy.cut()
    started = time.monotonic()
    assoc = associate(live.dimse_port)
    assert assoc.is_established
    reply = assoc.send_c_store(ct_dataset(1, study=STUDY))
    assoc.release()
    assert int(reply.Status) == 0xA700
    assert "database" in str(reply.ErrorComment)
    stow = raw(f"{live.http_url}/dicomweb/studies", method="POST",
               body=multipart_body([("application/dicom", part10(ct_dataset(2, study=STUDY)))]),
               headers={"Authorization": f"Bearer {token}",
                        "Content-Type": 'multipart/related; type="application/dicom"; '
                                        'boundary=XyZzYboundary'})
    assert stow.status == 503, stow.body[:300]
    assert stow.headers["Retry-After"]
    assert json.loads(stow.body)["status"] == 503
    search = raw(f"{live.http_url}/dicomweb/studies?StudyInstanceUID={STUDY}",
                 headers={"Authorization": f"Bearer {token}"})
    assert search.status == 503
    assert _readyz(live) == 503
    assert time.monotonic() - started < 30

    proxy.restore()  # back, with no restart of the gateway
    assert wait_until(lambda: _readyz(live) == 200, 30)
    assoc = associate(live.dimse_port)
    assert int(assoc.send_c_store(ct_dataset(1, study=STUDY)).Status) == 0
    assoc.release()
    search = raw(f"{live.http_url}/dicomweb/studies?StudyInstanceUID={STUDY}",
                 headers={"Authorization": f"Bearer {token}"})
    assert search.status == 200
    assert json.loads(search.body)[0]["00201208"]["Value"] == [2]
