"""Behind a load balancer: the client's address from X-Forwarded-For of trusted proxies only,
for the trail and the refusal limits (one client's garbage must not lock out the others)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from gateway.core import Gateway
from gateway.errors import SettingsError
from gateway.models import AuditRecord
from tests.support.common import LiveServer
from tests.support.dicomweb_helpers import api_key, raw
from tests.support.links_helpers import Client, fake_viewer, links_settings

LIMITS = "refusal_window = 3600\nmax_unverified_refusals = 5\n"


def gateway_behind(tmp_path: Path, database_url: str, proxies: str) -> Gateway:
    settings = links_settings(tmp_path, database_url, fake_viewer(tmp_path / "viewer"),
                              extra=LIMITS)
    http = type(settings.http)(**{**settings.http.__dict__,
                                  "trusted_proxies": tuple(p for p in proxies.split(",") if p)})
    return Gateway(type(settings)(**{**settings.__dict__, "http": http})).open()


def addresses(gateway: Gateway, action: str) -> list[str]:
    with gateway.index.Session() as session:
        return list(session.scalars(select(AuditRecord.address).where(
            AuditRecord.action == action)))


def test_the_trail_records_the_client_behind_a_trusted_proxy(tmp_path: Path,
                                                             database_url: str) -> None:
    gateway = gateway_behind(tmp_path, database_url, "127.0.0.0/8")
    try:
        token = api_key(gateway, "reader", "dicomweb:read")
        with LiveServer(gateway) as live:
            for forwarded in ("203.0.113.9", "1.1.1.1, 198.51.100.4", "not-an-address"):
                assert raw(f"{live.http_url}/dicomweb/studies",
                           headers={"Authorization": f"Bearer {token}",
                                    "X-Forwarded-For": forwarded}).status in (200, 204)
        # The rightmost untrusted hop; a malformed chain proves nothing (the proxy's own).
        assert sorted(addresses(gateway, "query")) == ["127.0.0.1", "198.51.100.4",
                                                       "203.0.113.9"]
    finally:
        gateway.close()


def test_the_header_of_an_untrusted_peer_is_ignored(tmp_path: Path, database_url: str) -> None:
    gateway = gateway_behind(tmp_path, database_url, "")
    try:
        token = api_key(gateway, "reader", "dicomweb:read")
        with LiveServer(gateway) as live:
            raw(f"{live.http_url}/dicomweb/studies",
                headers={"Authorization": f"Bearer {token}", "X-Forwarded-For": "203.0.113.9"})
        assert addresses(gateway, "query") == ["127.0.0.1"]
    finally:
        gateway.close()


def test_refusal_limits_count_each_client_not_the_proxy(tmp_path: Path,
                                                        database_url: str) -> None:
    gateway = gateway_behind(tmp_path, database_url, "127.0.0.1")
    try:
        with LiveServer(gateway) as live:
            browser = Client(live.http_url)
            statuses = [browser.request("GET", "/view/not-a-token",
                                        headers={"X-Forwarded-For": "198.51.100.1"}).status
                        for _ in range(8)]
            assert statuses == [400] * 5 + [429] * 3
            # Another client behind the same proxy is not locked out.
            assert browser.request("GET", "/view/not-a-token",
                                   headers={"X-Forwarded-For": "198.51.100.2"}).status == 400
    finally:
        gateway.close()


def test_a_bad_trusted_proxy_setting_is_named(tmp_path: Path) -> None:
    from gateway.config import load_settings

    with pytest.raises(SettingsError, match="trusted_proxies: '10.0.0.300'"):
        load_settings(environ={"GATEWAY_DATA_DIR": str(tmp_path),
                               "GATEWAY_HTTP_TRUSTED_PROXIES": "10.0.0.0/8,10.0.0.300"})
