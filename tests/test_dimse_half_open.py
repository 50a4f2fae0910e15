"""Connections that send part of an A-ASSOCIATE-RQ and wait, or close, replayed against the real
server: each is closed at its deadline (PS3.8 9.1.5, ARTIM) or as soon as the peer closes, costs
no CPU meanwhile, and only so many may be negotiating at once, overall and per address."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from gateway.core import Gateway
from tests.support.common import LiveServer, make_settings
from tests.support.dimse_helpers import associate, associate_request_pdu

A_ASSOCIATE_RJ = 0x03
REQUEST = associate_request_pdu([(1, CTImageStorage, [ExplicitVRLittleEndian])],
                                calling="SLOWSCU", called="DICOMGW")
PART = REQUEST[:20]  # the header and the start of the body: the rest never comes


@pytest.fixture
def server(request: pytest.FixtureRequest, tmp_path: Path,
           database_url: str) -> Iterator[LiveServer]:
    env = {"GATEWAY_DIMSE_ASSOCIATION_REQUEST_TIMEOUT": "60", **getattr(request, "param", {})}
    with Gateway(make_settings(tmp_path, database_url, **env)) as gateway, \
            LiveServer(gateway) as live:
        yield live


def half_open(port: int, stack: ExitStack) -> socket.socket:
    sock = stack.enter_context(socket.create_connection(("127.0.0.1", port)))
    sock.sendall(PART)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed ``sock`` within ``seconds``, and what it sent before."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return False, received
    return True, received


@pytest.mark.parametrize("server", [{"GATEWAY_DIMSE_ASSOCIATION_REQUEST_TIMEOUT": "1"}],
                         indirect=True)
def test_a_request_never_completed_is_closed_at_its_deadline(server: LiveServer) -> None:
    with ExitStack() as stack:
        sock = half_open(server.dimse_port, stack)
        assert closed_within(sock, 20)[0]


def test_a_connection_closed_mid_request_is_let_go_at_once(server: LiveServer) -> None:
    """The deadline is 60 s here: the server notices the close, not its deadline."""
    with ExitStack() as stack:
        sock = half_open(server.dimse_port, stack)
        sock.shutdown(socket.SHUT_WR)
        assert closed_within(sock, 15)[0]


@pytest.mark.parametrize("server", [{"GATEWAY_DIMSE_MAX_PENDING_PER_ADDRESS": "3"},
                                    {"GATEWAY_DIMSE_MAX_PENDING_ASSOCIATIONS": "3"}],
                         indirect=True, ids=["per-address", "overall"])
def test_connections_over_the_cap_are_rejected_at_once(server: LiveServer) -> None:
    with ExitStack() as stack:
        held = [half_open(server.dimse_port, stack) for _ in range(3)]
        # Accepted in order: once a whole association is answered, the three are waiting.
        extra = half_open(server.dimse_port, stack)
        closed, received = closed_within(extra, 15)
        assert closed
        assert received[:1] in (b"", bytes([A_ASSOCIATE_RJ]))
        for sock in held:  # a complete request now takes a freed place
            sock.close()
        assoc = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # the server sees the closes in its own time
            assoc = associate(server.dimse_port)
            if assoc.is_established:
                break
        assert assoc is not None and assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()


@pytest.mark.parametrize("server", [{"GATEWAY_DIMSE_MAX_PENDING_PER_ADDRESS": "200",
                                     "GATEWAY_DIMSE_MAX_PENDING_ASSOCIATIONS": "200"}],
                         indirect=True)
def test_a_hundred_half_open_connections_cost_no_cpu_and_echo_answers(
        server: LiveServer) -> None:
    """Polling them cost about 1.7 CPU-seconds a second; waiting in the kernel, nothing. The
    bound is generous: this is not a benchmark."""
    with ExitStack() as stack:
        held = [half_open(server.dimse_port, stack) for _ in range(100)]
        assoc = associate(server.dimse_port)  # accepted after the hundred
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        before = time.process_time()
        time.sleep(2.0)  # the window measured, not a wait for the server
        spent = time.process_time() - before
        assert spent < 1.0, f"{spent:.2f} CPU-seconds in 2 s with 100 half-open connections"
        assert not any(closed_within(sock, 0.01)[0] for sock in held[:5])
