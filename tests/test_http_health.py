"""Health, readiness and metrics over real HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from gateway.core import Gateway
from tests.support.common import LiveServer, ct_dataset, make_settings
from tests.support.dimse_helpers import associate


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def test_healthz_and_readyz(live: LiveServer) -> None:
    status, _, body = get(f"{live.http_url}/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, _, body = get(f"{live.http_url}/readyz")
    assert (status, json.loads(body)["status"]) == (200, "ready")


def test_readyz_fails_when_storage_is_full(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url, GATEWAY_STORAGE_MIN_FREE_BYTES=str(10**18))
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        status, _, body = get(f"{live.http_url}/readyz")
        assert status == 503
        assert "storage.min_free_bytes" in json.loads(body)["problems"][0]


def test_metrics_count_stored_instances(live: LiveServer) -> None:
    assoc = associate(live.dimse_port)
    assert assoc.send_c_store(ct_dataset(0)).Status == 0
    assoc.release()
    status, headers, body = get(f"{live.http_url}/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert "# TYPE gateway_instances_stored_total counter" in text
    assert "gateway_index_instances 1" in text
