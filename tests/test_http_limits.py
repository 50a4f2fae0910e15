"""Limits of the HTTP front end, each replayed through the real server on 127.0.0.1.

Slow request heads (slowloris), request bodies read whole, STOW-RS part counts and sizes,
rendered-image work, frame numbers and QIDO-RS sequence keys, the demo mode's Host check
and the session cookie's ``Secure`` attribute (docs/security-http-part.md).
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import LiveServer, make_settings
from dicomweb_helpers import api_key, raw

from gateway.core import Gateway

# How long a test waits for the server to close a connection it must close (generous: the
# configured bound in these tests is 1 s; a server without the bound never closes).
CLOSE_WAIT_SECONDS = 30.0


@pytest.fixture
def live_with(tmp_path: Path, database_url: str) -> Iterator[object]:
    """A factory: a live gateway with extra ``GATEWAY_*`` settings."""
    opened: list[tuple[Gateway, LiveServer]] = []

    def start(**env: str) -> LiveServer:
        gateway = Gateway(make_settings(tmp_path, database_url, **env)).open()
        server = LiveServer(gateway).__enter__()
        opened.append((gateway, server))
        return server

    yield start
    for gateway, server in reversed(opened):
        server.__exit__(None, None, None)
        gateway.close()


def closed_by_server(sock: socket.socket, trickle: bytes) -> bool:
    """Send ``trickle`` a byte at a time until the server closes the connection (True) or
    :data:`CLOSE_WAIT_SECONDS` pass (False)."""
    deadline = time.monotonic() + CLOSE_WAIT_SECONDS
    position = 0
    while time.monotonic() < deadline:
        if position < len(trickle):
            try:
                sock.send(trickle[position:position + 1])
            except (BrokenPipeError, ConnectionResetError):
                return True
            position += 1
        readable, _, _ = select.select([sock], [], [], 0.2)
        if readable:
            try:
                if sock.recv(65536) == b"":
                    return True
            except ConnectionResetError:
                return True
    return False


# -- item 6: request heads and bodies ----------------------------------------------------------
def test_partial_request_line_is_closed_within_the_idle_timeout(live_with) -> None:  # noqa: ANN001
    live = live_with(GATEWAY_HTTP_IDLE_TIMEOUT="1")
    address = urlsplit(live.http_url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HT")
        assert closed_by_server(sock, b"")


def test_trickled_headers_are_closed_within_the_idle_timeout(live_with) -> None:  # noqa: ANN001
    live = live_with(GATEWAY_HTTP_IDLE_TIMEOUT="1")
    address = urlsplit(live.http_url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        assert closed_by_server(sock, b"a" * 10_000)


def test_a_connection_serves_requests_within_the_idle_timeout(live_with) -> None:  # noqa: ANN001
    live = live_with(GATEWAY_HTTP_IDLE_TIMEOUT="30")
    address = urlsplit(live.http_url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        for _ in range(2):  # keep-alive: the same connection twice
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")


def test_portal_json_body_is_bounded(live_with) -> None:  # noqa: ANN001
    live = live_with(GATEWAY_HTTP_MAX_JSON_BYTES="65536")
    token = api_key(live.gateway, "portal", "links:mint")
    body = json.dumps({"study": "1.2.3", "viewer": {"id": "x" * 100_000},
                       "relationship": "patient"}).encode()
    reply = raw(live.http_url + "/api/links", method="POST", body=body,
                headers={"Authorization": f"Bearer {token}",
                         "Content-Type": "application/json"})
    assert reply.status == 413
    assert reply.headers["Content-Type"].startswith("application/problem+json")
    assert "http.max_json_bytes" in json.loads(reply.body)["detail"]


def test_portal_json_default_bound_is_small(live_with) -> None:  # noqa: ANN001
    live = live_with()
    assert live.gateway.settings.http.max_json_bytes == 1024**2
    token = api_key(live.gateway, "portal", "links:mint")
    body = b'{"pad": "' + b"x" * (2 * 1024**2) + b'"}'
    reply = raw(live.http_url + "/api/links", method="POST", body=body,
                headers={"Authorization": f"Bearer {token}",
                         "Content-Type": "application/json"})
    assert reply.status == 413
