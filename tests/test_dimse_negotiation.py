"""Association negotiation remembered per proposal (dimse.loop.negotiation): over real TCP on
127.0.0.1, a proposal seen again is answered as the first time, each answer repeating its own
request's AE titles, and every association is still judged by its own titles (peer rules,
called AE); and the store of outcomes itself: one negotiation for requests arriving together,
bounded, nothing kept of a failure."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)
from pynetdicom import build_context

from dimse.loop.negotiation import Negotiated, Negotiations, negotiate
from dimse.loop.upper_layer import A_ABORT, INVALID_PDU_PARAMETER, SERVICE_PROVIDER, ProtocolError
from dimse.scp import AssociationServer
from gateway.core import Gateway
from tests.support.common import LiveServer, make_settings
from tests.support.dimse_helpers import (
    A_ASSOCIATE_AC,
    RELEASE_RQ,
    RawAssociation,
    associate_request_pdu,
    association_rejection,
)

UNSUPPORTED_SYNTAX = "1.2.840.10008.1.2.999"
CONTEXTS = [(1, CTImageStorage, [ExplicitVRLittleEndian]),
            (3, MRImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]),
            (5, CTImageStorage, [UNSUPPORTED_SYNTAX])]


def negotiations_of(live: LiveServer) -> Negotiations:
    server = live.server.dimse
    assert isinstance(server, AssociationServer) and server.acceptor is not None
    return server.acceptor.negotiations


def accept_pdu(port: int, request: bytes) -> bytes:
    """Send an A-ASSOCIATE-RQ over a plain socket; the A-ASSOCIATE-AC PDU that came back,
    whole, once the association is released."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        raw = RawAssociation(sock, {})
        sock.sendall(request)
        pdu_type, body = raw.read_pdu()
        assert pdu_type == A_ASSOCIATE_AC, f"PDU type 0x{pdu_type:02X}"
        raw.send(RELEASE_RQ)
        raw.read_pdu()
        return bytes([pdu_type, 0]) + len(body).to_bytes(4, "big") + body


def test_a_proposal_seen_again_gets_the_same_answer_with_its_own_titles(
        live: LiveServer) -> None:
    first = associate_request_pdu(CONTEXTS, calling="FIRSTSCU", called="DICOMGW")
    second = associate_request_pdu(CONTEXTS, calling="SECOND", called="  DICOMGW")
    first_answer = accept_pdu(live.dimse_port, first)
    second_answer = accept_pdu(live.dimse_port, second)
    assert len(negotiations_of(live)) == 1  # the second was answered from what was kept
    # The AE title fields repeat each request's own (PS3.8 Table 9-17) ...
    assert first_answer[10:42] == first[10:42]
    assert second_answer[10:42] == second[10:42]
    assert first_answer[10:42] != second_answer[10:42]
    # ... and the rest is the same answer: contexts 1 and 3 accepted in the requestor's
    # preferred syntax, 5 refused (transfer syntaxes not supported).
    assert first_answer[42:] == second_answer[42:]
    negotiated = negotiate(first, list(live.server.dimse.acceptor.supported), 16384)
    assert negotiated is not None
    assert negotiated.contexts == {1: (CTImageStorage, ExplicitVRLittleEndian),
                                   3: (MRImageStorage, ImplicitVRLittleEndian)}


def test_another_proposal_is_negotiated_anew(live: LiveServer) -> None:
    ct_only = associate_request_pdu(CONTEXTS[:1], calling="SCU", called="DICOMGW")
    both = associate_request_pdu(CONTEXTS, calling="SCU", called="DICOMGW")
    assert accept_pdu(live.dimse_port, ct_only)[42:] != accept_pdu(live.dimse_port, both)[42:]
    assert len(negotiations_of(live)) == 2


def test_a_kept_answer_admits_no_peer_the_rules_refuse(tmp_path: Path,
                                                       database_url: str) -> None:
    """The same proposal from an allowed peer, then from a peer that may do nothing, then to
    another called AE title: each judged by its own titles."""
    config = tmp_path / "gateway.toml"
    config.write_text('[dimse.peers.MODALITY]\nstore = true\n'
                      '[dimse.peers.BLOCKED]\necho = false\nfind = false\nmove = false\n'
                      'get = false\n')
    settings = make_settings(tmp_path, database_url, GATEWAY_CONFIG=str(config))
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        assert association_rejection(live.dimse_port, calling="MODALITY") is None
        # rejected-permanent by the service user: calling AE title not recognised (0x03),
        # called AE title not recognised (0x07)
        assert association_rejection(live.dimse_port, calling="BLOCKED") == (0x01, 0x01, 0x03)
        assert association_rejection(live.dimse_port, calling="MODALITY",
                                     called="NOTME") == (0x01, 0x01, 0x07)
        assert association_rejection(live.dimse_port, calling="MODALITY") is None
        assert len(negotiations_of(live)) == 1


# -- the store of outcomes ----------------------------------------------------------------------
SUPPORTED = [build_context(CTImageStorage, [ExplicitVRLittleEndian]),
             build_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]


def request(calling: str = "SCU", contexts: int = 2) -> bytes:
    return associate_request_pdu(CONTEXTS[:contexts], calling=calling, called="DICOMGW")


def test_requests_arriving_together_wait_for_one_negotiation() -> None:
    computed: list[bytes] = []
    release = threading.Event()

    def compute(data: bytes) -> Negotiated | None:
        computed.append(data)
        release.wait(10)
        return negotiate(data, SUPPORTED, 16384)

    negotiations = Negotiations(compute)
    answers: list[Negotiated | None] = []
    threads = [threading.Thread(target=lambda n=n: answers.append(
        negotiations.get(request(f"SCU{n}")))) for n in range(6)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while not computed and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the other five have asked meanwhile
    release.set()
    for thread in threads:
        thread.join(10)
    assert len(computed) == 1
    assert len(answers) == 6 and answers[0] is not None
    assert all(answer is answers[0] for answer in answers)
    assert answers[0].contexts == {1: (CTImageStorage, ExplicitVRLittleEndian),
                                   3: (MRImageStorage, ImplicitVRLittleEndian)}


def test_only_the_last_proposals_are_kept() -> None:
    computed: list[bytes] = []

    def compute(data: bytes) -> Negotiated | None:
        computed.append(data)
        return negotiate(data, SUPPORTED, 16384)

    negotiations = Negotiations(compute, kept=2)
    for contexts in (1, 2, 3, 3, 1):
        negotiations.get(request(contexts=contexts))
    # 1, 2, 3 computed; 3 kept; 1 had made way for 3 and is computed again
    assert len(computed) == 4
    assert len(negotiations) == 2


def test_a_failed_negotiation_is_not_kept() -> None:
    attempts: list[bytes] = []

    def compute(data: bytes) -> Negotiated | None:
        attempts.append(data)
        if len(attempts) == 1:
            raise RuntimeError("a defect")
        return negotiate(data, SUPPORTED, 16384)

    negotiations = Negotiations(compute)
    with pytest.raises(RuntimeError):
        negotiations.get(request())
    assert len(negotiations) == 0
    assert negotiations.get(request()) is not None
    assert len(attempts) == 2


def test_what_pynetdicom_must_answer_is_not_negotiated_here() -> None:
    """Garbage, or a request proposing no context: ``None``, pynetdicom reads it."""
    assert negotiate(b"\x01\x00\x00\x00\x00\x04abcd", SUPPORTED, 16384) is None
    assert negotiate(associate_request_pdu([], calling="SCU", called="DICOMGW"),
                     SUPPORTED, 16384) is None


def _without_sub_items(request: bytes, sub_type: int) -> bytes:
    """``request`` with the sub-items of type ``sub_type`` (0x30 abstract syntax, 0x40
    transfer syntax) of its first presentation context item (0x20) cut out, the lengths of the
    item and the PDU made to agree (PS3.8 9.3.2.2)."""
    item = request.index(b"\x20\x00", 74)
    end = item + 4 + int.from_bytes(request[item + 2:item + 4], "big")
    kept, sub = b"", item + 8
    while sub < end:
        size = 4 + int.from_bytes(request[sub + 2:sub + 4], "big")
        if request[sub] != sub_type:
            kept += request[sub:sub + size]
        sub += size
    body = request[item + 4:item + 8] + kept
    out = request[:item + 2] + len(body).to_bytes(2, "big") + body + request[end:]
    return out[:2] + (len(out) - 6).to_bytes(4, "big") + out[6:]


@pytest.mark.parametrize(("sub_type", "missing"), [(0x30, "abstract"), (0x40, "transfer")])
def test_a_context_without_its_syntaxes_is_aborted_and_the_server_goes_on(
        live: LiveServer, sub_type: int, missing: str) -> None:
    """pynetdicom decodes such an item; its negotiation then raised TypeError or IndexError
    inside the gateway's accept path (found by fuzz/fuzz_pdu.py), and its own acceptor fails
    on it too: the peer got no answer. Now it is aborted (PS3.8 9.3.8: service provider,
    invalid PDU parameter value), and the next association is served."""
    malformed = _without_sub_items(request(contexts=1), sub_type)
    with pytest.raises(ProtocolError, match=f"no {missing} syntax"):
        negotiate(malformed, SUPPORTED, 16384)
    with socket.create_connection(("127.0.0.1", live.dimse_port), timeout=10) as sock:
        raw = RawAssociation(sock, {})
        sock.sendall(malformed)
        pdu_type, body = raw.read_pdu()
    assert (pdu_type, body[2:4]) == (A_ABORT, bytes([SERVICE_PROVIDER, INVALID_PDU_PARAMETER]))
    accept_pdu(live.dimse_port, request())
