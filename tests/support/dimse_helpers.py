"""Helpers to speak DIMSE from tests, including malformed data no well-behaved SCU would send."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_AC as A_ASSOCIATE_AC_PDU
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]


def associate(port: int, *, calling: str = "TESTSCU", called: str = "DICOMGW",
              contexts: list[str] | None = None) -> Any:
    ae = AE(ae_title=calling)
    for context in contexts or [Verification, CTImageStorage]:
        ae.add_requested_context(context, [ExplicitVRLittleEndian])
    return ae.associate("127.0.0.1", port, ae_title=called)


def send_raw_store(assoc: Any, sop_class: str, sop_instance: str, dataset_bytes: bytes,
                   transfer_syntax: str = ExplicitVRLittleEndian) -> int:
    """Send a C-STORE whose data set is ``dataset_bytes`` exactly; return the status."""
    context = next(cx for cx in assoc.accepted_contexts
                   if cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == transfer_syntax)
    req = C_STORE()
    req.MessageID = 1
    req.Priority = 2
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_instance
    req.DataSet = BytesIO(dataset_bytes)
    assoc._reactor_checkpoint.clear()  # noqa: SLF001 - as send_c_store does
    while not assoc._is_paused:  # noqa: SLF001
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(req, context.context_id)
        _cx, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()  # noqa: SLF001
    assert rsp is not None, "no C-STORE response"
    return int(rsp.Status)


def status_of(result: Dataset) -> int:
    return int(result.Status)


# -- raw Upper Layer protocol (PS3.8 Section 9.3): what a test sends byte by byte -------------
# PDU types and Message Control Header bits, written out here rather than imported from the
# gateway so that a test does not share the code it checks.
A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF = 0x02, 0x03, 0x04
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x05, 0x06, 0x07
COMMAND, LAST = 0x01, 0x02


def pdu(pdu_type: int, body: bytes) -> bytes:
    """A PDU: type, reserved byte, big endian length, body."""
    return struct.pack(">BxI", pdu_type, len(body)) + body


def p_data(*values: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU of presentation data values ``(context ID, control, fragment)``."""
    return pdu(P_DATA_TF, b"".join(struct.pack(">IBB", len(fragment) + 2, context_id, control)
                                   + fragment for context_id, control, fragment in values))


def abort_pdu(source: int = 0x00, reason: int = 0x00) -> bytes:
    return pdu(A_ABORT, bytes([0, 0, source, reason]))


RELEASE_RQ = pdu(A_RELEASE_RQ, bytes(4))


def encode_command(**elements: Any) -> bytes:
    """A command set (implicit VR little endian) of the given group 0000 keywords, with its
    Command Group Length, encoded by pydicom."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    body = encode(ds, True, True)
    assert body is not None
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def fragments(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@dataclass
class RawAssociation:
    """An association a test runs over a plain socket, PDU by PDU."""

    sock: socket.socket
    # accepted context ID -> (abstract syntax, transfer syntax)
    contexts: dict[int, tuple[str, str]]
    # the Maximum Length the peer announced in its A-ASSOCIATE-AC
    peer_max_pdu: int = 0
    # the length of every PDU read, in order
    pdu_lengths: list[int] = field(default_factory=list)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {size} bytes")
            data += chunk
        return data

    def read_pdu(self) -> tuple[int, bytes]:
        """The next PDU's type and body."""
        pdu_type, length = struct.unpack(">BxI", self.recv_exact(6))
        self.pdu_lengths.append(length)
        return pdu_type, self.recv_exact(length)

    def read_message(self) -> tuple[int, Dataset, bytes | None]:
        """The next DIMSE message: its context ID, command set and data set bytes (if any)."""
        command = b""
        data: bytes | None = None
        context_id = 0
        while True:
            pdu_type, body = self.read_pdu()
            assert pdu_type == P_DATA_TF, f"PDU type 0x{pdu_type:02X}, body {body.hex()}"
            offset = 0
            while offset < len(body):
                length, context_id, control = struct.unpack_from(">IBB", body, offset)
                fragment = body[offset + 6:offset + 4 + length]
                offset += 4 + length
                if control & COMMAND:
                    command += fragment
                    if control & LAST:
                        ds = decode(BytesIO(command), True, True)
                        if ds.CommandDataSetType == 0x0101:
                            return context_id, ds, None
                        data = b""
                else:
                    assert data is not None, "a data set before its command"
                    data += fragment
                    if control & LAST:
                        return context_id, decode(BytesIO(command), True, True), data

    def ends(self, timeout: float = 10.0) -> bytes:
        """Wait until the peer closes the connection; what it sent before (nothing, normally)."""
        self.sock.settimeout(timeout)
        rest = b""
        try:
            while chunk := self.sock.recv(65536):
                rest += chunk
        except ConnectionResetError:
            pass
        return rest

    def close(self) -> None:
        self.sock.close()


def associate_request_pdu(contexts: list[tuple[int, str, list[str]]], *, calling: str,
                          called: str, max_pdu: int = 16382,
                          user_items: list[Any] | None = None) -> bytes:
    """An A-ASSOCIATE-RQ PDU encoded by pynetdicom, proposing ``(context ID, abstract syntax,
    transfer syntaxes)``, with ``user_items`` after the maximum length and implementation
    class UID."""
    request = A_ASSOCIATE()
    request.application_context_name = UID("1.2.840.10008.3.1.1.1")
    request.calling_ae_title = calling
    request.called_ae_title = called
    for context_id, abstract_syntax, transfer_syntaxes in contexts:
        context = PresentationContext()
        context.context_id = context_id
        context.abstract_syntax = UID(abstract_syntax)
        context.transfer_syntax = [UID(s) for s in transfer_syntaxes]
        request.presentation_context_definition_list.append(context)
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = UID("1.2.826.0.1.3680043.8.498.99")
    request.user_information = [max_length, class_uid, *(user_items or [])]
    encoded = A_ASSOCIATE_RQ()
    encoded.from_primitive(request)
    return bytes(encoded.encode())


def raw_associate(port: int, contexts: list[tuple[int, str, list[str]]], *,
                  calling: str = "RAWSCU", called: str = "DICOMGW", max_pdu: int = 16382,
                  timeout: float = 10.0, split: tuple[int, float] | None = None
                  ) -> RawAssociation:
    """Open an association over a plain socket: the A-ASSOCIATE-RQ of
    :func:`associate_request_pdu`, and the A-ASSOCIATE-AC decoded by pynetdicom.

    ``split=(n, pause)`` sends the request's first ``n`` bytes, waits ``pause`` seconds, then
    sends the rest: the request reaches the peer in two TCP segments, as a large one does.
    """
    proposed = {context_id: abstract_syntax for context_id, abstract_syntax, _ in contexts}
    data = associate_request_pdu(contexts, calling=calling, called=called, max_pdu=max_pdu)
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    raw = RawAssociation(sock, {})
    try:
        if split is None:
            sock.sendall(data)
        else:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(data[:split[0]])
            time.sleep(split[1])
            sock.sendall(data[split[0]:])
        pdu_type, body = raw.read_pdu()
        assert pdu_type == A_ASSOCIATE_AC, f"PDU type 0x{pdu_type:02X}"
        accept = A_ASSOCIATE_AC_PDU()
        accept.decode(pdu(pdu_type, body))
        reply = accept.to_primitive()
        for item in reply.user_information:
            if isinstance(item, MaximumLengthNotification):
                raw.peer_max_pdu = int(item.maximum_length_received or 0)
        for result in reply.presentation_context_definition_results_list:
            if result.result == 0x00 and result.context_id is not None:
                raw.contexts[int(result.context_id)] = (
                    proposed[int(result.context_id)], str(result.transfer_syntax[0]))
    except BaseException:
        sock.close()
        raise
    return raw


def association_rejection(port: int, *, calling: str = "RAWSCU", called: str = "DICOMGW",
                          user_items: list[Any] | None = None,
                          timeout: float = 10.0) -> tuple[int, int, int] | None:
    """Ask for a storage association over a plain socket and return the (result, source,
    reason) of the A-ASSOCIATE-RJ that came back (PS3.8 9.3.4), or ``None`` if it was
    accepted (then released).

    pynetdicom's requestor cannot tell a fast rejection from an abort: if its reader thread
    has received the A-ASSOCIATE-RJ and closed the socket before the requesting thread looks
    at the connection, the association is reported aborted, not rejected. The PDU on the
    wire is what a rejection test asserts.
    """
    contexts = [(1, str(Verification), [ExplicitVRLittleEndian]),
                (3, str(CTImageStorage), [ExplicitVRLittleEndian])]
    data = associate_request_pdu(contexts, calling=calling, called=called,
                                 user_items=user_items)
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    raw = RawAssociation(sock, {})
    try:
        sock.sendall(data)
        pdu_type, body = raw.read_pdu()
        if pdu_type == A_ASSOCIATE_AC:
            raw.send(RELEASE_RQ)
            raw.read_pdu()
            return None
        assert pdu_type == A_ASSOCIATE_RJ, f"PDU type 0x{pdu_type:02X}"
        # PS3.8 Table 9-21: reserved, result, source, reason/diagnostic
        return body[1], body[2], body[3]
    finally:
        sock.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds passed; its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        time.sleep(0.005)
    return True
