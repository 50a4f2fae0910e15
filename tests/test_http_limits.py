"""Limits of the HTTP front end, each replayed through the real server on 127.0.0.1.

Slow request heads (slowloris), request bodies read whole, STOW-RS part counts and sizes,
rendered-image work, frame numbers and QIDO-RS sequence keys, the demo mode's Host check
and the session cookie's ``Secure`` attribute (docs/security.md).
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

from gateway.core import Gateway
from gateway.models import Instance
from tests.support.common import LiveServer, ct_dataset, make_settings, part10
from tests.support.dicomweb_helpers import api_key, load_corpus, multipart_body, raw
from tests.support.qr_helpers import load_sequence_studies

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


# -- item 7: numbers too long to mean anything, sequence keys on every row ----------------------
def reader(live: LiveServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key(live.gateway, 'reader', 'dicomweb:read')}"}


def problem_of(reply: object) -> dict[str, object]:
    assert reply.headers["Content-Type"].startswith("application/problem+json")  # type: ignore[attr-defined]
    return json.loads(reply.body)  # type: ignore[attr-defined]


@pytest.mark.parametrize("tail", ["frames/{n}", "frames/{n}/rendered", "frames/1,{n}/thumbnail",
                                  "bulk/00081032/{n}/00080100"])
def test_numbers_of_thousands_of_digits_are_400(live_with, tail: str) -> None:  # noqa: ANN001
    live = live_with()
    corpus = load_corpus(live.gateway)
    instance = corpus.instances(corpus.series_a_ct)[0]
    path = (f"/dicomweb/studies/{corpus.study_a}/series/{corpus.series_a_ct}/instances/"
            f"{instance}/" + tail.format(n="9" * 5000))
    reply = raw(live.http_url + path, headers=reader(live))
    assert reply.status == 400, reply.body[:300]
    assert "characters" in str(problem_of(reply)["detail"]) or "item index" in str(
        problem_of(reply)["detail"])


@pytest.mark.parametrize("query", ["studies?offset=" + "9" * 25, "studies?limit=" + "9" * 5000,
                                   "series?SeriesNumber=" + "9" * 25])
def test_qido_integers_beyond_bigint_are_400(live_with, query: str) -> None:  # noqa: ANN001
    live = live_with()
    load_corpus(live.gateway)
    reply = raw(live.http_url + "/dicomweb/" + query, headers=reader(live))
    assert reply.status == 400, reply.body[:300]
    assert "at most 19 digits" in str(problem_of(reply)["detail"])


def test_sequence_keys_parse_a_bounded_number_of_records(live_with) -> None:  # noqa: ANN001
    live = live_with(GATEWAY_HTTP_MAX_SEQUENCE_SCAN="2")
    load_sequence_studies(live.gateway)  # three series, two of them with the sequence
    headers = reader(live)

    def get(query: str) -> tuple[int, object]:
        reply = raw(live.http_url + "/dicomweb/" + query, headers=headers)
        return reply.status, json.loads(reply.body) if reply.body else []

    # A page of one needs two matching candidates (one to return, one to tell more exist):
    # the scan stops there, within the bound.
    status, found = get("series?00400275.00400009=SPS*&limit=1")
    assert status == 200 and len(found) == 1  # type: ignore[arg-type]
    # Every series must be parsed to fill a bigger page: more than the bound, refused.
    status, problem = get("series?00400275.00400009=SPS*")
    assert status == 400
    assert "http.max_sequence_scan" in problem["detail"]  # type: ignore[index]
    assert problem["parameter"] == "RequestAttributesSequence"  # type: ignore[index]


# -- item 5: STOW-RS parts ----------------------------------------------------------------------
STOW_STUDY = "1.2.826.0.1.3680043.8.498.66"
MULTIPART_DICOM = 'multipart/related; type="application/dicom"; boundary=XyZzYboundary'


def stow(live: LiveServer, body: bytes) -> object:
    token = api_key(live.gateway, "writer", "dicomweb:write")
    return raw(live.http_url + "/dicomweb/studies", method="POST", body=body,
               headers={"Authorization": f"Bearer {token}", "Content-Type": MULTIPART_DICOM})


def stored(live: LiveServer) -> int:
    with live.gateway.index.Session() as session:
        return session.query(Instance).count()


def test_stow_part_count_is_bounded(live_with) -> None:  # noqa: ANN001
    live = live_with(GATEWAY_HTTP_MAX_STOW_PARTS="3")
    good = [part10(ct_dataset(i, study=STOW_STUDY)) for i in range(2)]
    body = multipart_body([("application/dicom", d) for d in good]
                          + [("application/dicom", b"")] * 1000)
    reply = stow(live, body)
    assert reply.status == 413
    assert "http.max_stow_parts" in str(problem_of(reply)["detail"])
    assert stored(live) == 2  # the parts before the limit are kept, as the answer says


def test_stow_part_size_is_bounded(live_with) -> None:  # noqa: ANN001
    live = live_with(GATEWAY_HTTP_MAX_PART_BYTES="4096")
    small = part10(ct_dataset(0, study=STOW_STUDY, rows=8))
    large = part10(ct_dataset(1, study=STOW_STUDY, rows=64))
    assert len(small) < 4096 < len(large)
    reply = stow(live, multipart_body([("application/dicom", small),
                                       ("application/dicom", large)]))
    assert reply.status == 413
    assert "http.max_part_bytes" in str(problem_of(reply)["detail"])
    assert stored(live) == 1


def test_stow_bare_data_sets_and_empty_parts(live_with) -> None:  # noqa: ANN001
    """A part without the preamble (pydicom's dcmwrite) is stored as the Part 10 file it is,
    whether it is kept in memory or spooled to a file; an empty part is refused by itself."""
    live = live_with()
    small = part10(ct_dataset(0, study=STOW_STUDY))
    large_ds = ct_dataset(1, study=STOW_STUDY, rows=4000)  # 32 MB: spooled to a file
    large = part10(large_ds)
    body = multipart_body([("application/dicom", small[132:]), ("application/dicom", b""),
                           ("application/dicom", large[132:])])
    reply = stow(live, body)
    assert reply.status == 202, reply.body[:300]  # type: ignore[attr-defined]
    assert stored(live) == 2


# -- item 13: demo mode and DNS rebinding -------------------------------------------------------
def get_with_host(live: LiveServer, path: str, host: str) -> tuple[int, bytes]:
    address = urlsplit(live.http_url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                     .encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_demo_mode_answers_only_loopback_host_names(live_with) -> None:  # noqa: ANN001
    live = live_with(GATEWAY_DEMO="1")
    load_corpus(live.gateway)
    port = urlsplit(live.http_url).port
    # A page of rebind.example whose name now resolves to 127.0.0.1: its browser says so.
    for host in (f"rebind.example:{port}", "rebind.example", f"127.0.0.1.rebind.example:{port}"):
        status, body = get_with_host(live, "/dicomweb/studies", host)
        assert status == 421, host
        assert "demo mode" in json.loads(body)["detail"]
    status, _ = get_with_host(live, "/healthz", "rebind.example")
    assert status == 421
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        status, body = get_with_host(live, "/dicomweb/studies", host)
        assert status == 200, host
        assert len(json.loads(body)) == 3


def test_host_is_not_checked_outside_demo_mode(live_with) -> None:  # noqa: ANN001
    live = live_with()
    status, _ = get_with_host(live, "/healthz", "pacs.example.lu")
    assert status == 200


# -- item 4: rendered images --------------------------------------------------------------------
def test_rendered_frames_are_rendered_once_each(live_with) -> None:  # noqa: ANN001
    live = live_with()
    corpus = load_corpus(live.gateway)
    instance = corpus.instances(corpus.series_a_ct)[0]
    frames = ",".join(["1"] * 40)
    path = (f"/dicomweb/studies/{corpus.study_a}/series/{corpus.series_a_ct}/instances/"
            f"{instance}/frames/{frames}/rendered?viewport=1024,1024")
    reply = raw(live.http_url + path, headers=reader(live))
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "image/jpeg"  # one frame asked 40 times: one image
    assert reply.body[:2] == b"\xff\xd8"


def test_rendered_output_pixels_are_bounded(live_with, tmp_path: Path) -> None:  # noqa: ANN001
    config = tmp_path / "pixels.toml"
    config.write_text("[pixels]\nmax_rendered_pixels = 20000000\n")
    live = live_with(GATEWAY_CONFIG=str(config))
    corpus = load_corpus(live.gateway)
    headers = reader(live)
    series = f"/dicomweb/studies/{corpus.study_a}/series/{corpus.series_a_ct}"
    instance = f"{series}/instances/{corpus.instances(corpus.series_a_ct)[0]}"
    # Three instances at 4096x4096: 50 M pixels, over the bound.
    reply = raw(live.http_url + series + "/rendered?viewport=4096,4096", headers=headers)
    assert reply.status == 413
    assert "max_rendered_pixels" in str(problem_of(reply)["detail"])
    reply = raw(live.http_url + instance + "/frames/1,1/rendered?viewport=4096,4096",
                headers=headers)
    assert reply.status == 200  # the same frame twice is one frame: 16.7 M pixels
    reply = raw(live.http_url + instance + "/rendered?viewport=4096,4096", headers=headers)
    assert reply.status == 200
    reply = raw(live.http_url + series + "/rendered?viewport=512,512", headers=headers)
    assert reply.status == 200
