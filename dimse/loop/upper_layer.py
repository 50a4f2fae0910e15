"""DICOM Upper Layer framing (PS3.8 Section 9.3) for the gateway's own association loops.

pynetdicom's DUL runs a reactor thread per association that polls its queues every
millisecond, and decodes every P-DATA-TF into objects passed between threads. For the
associations that carry only storage (the bulk of the traffic: modalities and PACS pushing
studies, C-MOVE sub-operations going out), :mod:`dimse.loop.acceptor` and
:mod:`dimse.loop.storage_scu` read and write PDUs on the socket directly with these helpers, in the
association's one thread, blocking: no polling, no queue, one copy of each fragment.
A-ASSOCIATE PDUs are still encoded and decoded by pynetdicom (:mod:`pynetdicom.pdu`).
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Callable, Iterator
from typing import Any

from dimse.transport import TCP_QUICKACK
from gateway.errors import GatewayError

# PDU types (PS3.8 Section 9.3.1).
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
PDU_TYPES = frozenset(range(0x01, 0x08))

# Message Control Header bits of a presentation data value (PS3.8 Annex E.2).
COMMAND = 0x01
LAST_FRAGMENT = 0x02

# A-ABORT source and reasons (PS3.8 Section 9.3.8).
SERVICE_USER = 0x00
SERVICE_PROVIDER = 0x02
REASON_NOT_SPECIFIED = 0x00
UNRECOGNIZED_PDU = 0x01
UNEXPECTED_PDU = 0x02
INVALID_PDU_PARAMETER = 0x06

_PDU_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")

RELEASE_RQ_PDU = bytes([A_RELEASE_RQ, 0]) + struct.pack(">I", 4) + bytes(4)
RELEASE_RP_PDU = bytes([A_RELEASE_RP, 0]) + struct.pack(">I", 4) + bytes(4)


class PeerClosed(GatewayError):
    """The peer closed the connection (or sent an A-ABORT)."""


class ProtocolError(GatewayError):
    """The peer broke the Upper Layer protocol; the association is aborted."""

    def __init__(self, message: str, reason: int = INVALID_PDU_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


def abort_pdu(source: int = SERVICE_PROVIDER, reason: int = REASON_NOT_SPECIFIED) -> bytes:
    """An A-ABORT PDU (PS3.8 Section 9.3.8)."""
    return bytes([A_ABORT, 0]) + struct.pack(">I", 4) + bytes([0, 0, source, reason])


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 Section 9.3.4)."""
    return bytes([A_ASSOCIATE_RJ, 0]) + struct.pack(">I", 4) + bytes([0, result, source, reason])


class PduReader:
    """Reads PDUs off a socket with as few system calls as the traffic allows.

    Each ``recv_into`` asks for up to ``chunk`` bytes, which on a busy association brings
    several PDUs at once (a 0.5 MB data set in 16 KB PDUs: ~4 reads instead of 64); a PDU body
    larger than what arrived is completed by reading straight into its own buffer. Bodies are
    returned as independent ``bytearray`` objects: fragments taken from them stay valid.
    ``TCP_QUICKACK`` is re-armed after each read, so a Nagle-held sender is acknowledged at once
    (BENCHMARKING.md, "The TCP trap").
    """

    def __init__(self, sock: socket.socket, chunk: int = 256 * 1024) -> None:
        self.sock = sock
        self._buffer = bytearray(chunk)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0
        self._quickack = TCP_QUICKACK

    def buffered(self) -> int:
        """Bytes already read and not yet returned."""
        return self._end - self._start

    def read_pdu(self, max_length: int) -> tuple[int, bytearray]:
        """The next PDU's type and body (the bytes after its 6-byte header)."""
        self._fill(6)
        pdu_type, length = _PDU_HEADER.unpack_from(self._buffer, self._start)
        if length > max_length:
            raise ProtocolError(f"PDU of {length} bytes exceeds the {max_length}-byte limit")
        self._start += 6
        body = bytearray(length)
        have = min(self.buffered(), length)
        body[:have] = self._view[self._start:self._start + have]
        self._start += have
        if have < length:
            self._recv_into(memoryview(body)[have:])
        return pdu_type, body

    def _fill(self, size: int) -> None:
        if self.buffered() >= size:
            return
        if self._start:
            remaining = self.buffered()
            self._buffer[:remaining] = self._view[self._start:self._end]
            self._start, self._end = 0, remaining
        while self._end < size:
            n = _timed(self.sock.recv_into, self._view[self._end:])
            self._ack()
            if not n:
                raise PeerClosed("the peer closed the connection")
            self._end += n

    def _recv_into(self, target: memoryview) -> None:
        while len(target):
            n = _timed(self.sock.recv_into, target)
            self._ack()
            if not n:
                raise PeerClosed("the peer closed the connection")
            target = target[n:]

    def _ack(self) -> None:
        if self._quickack is not None:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, self._quickack, 1)
            except OSError:
                self._quickack = None


def _timed(call: Callable[[Any], int], argument: Any) -> int:
    """``call(argument)``, a kernel timeout (:func:`dimse.transport.use_kernel_timeouts`)
    raised as :class:`TimeoutError`, as a Python timeout would be."""
    try:
        return call(argument)
    except BlockingIOError as exc:
        raise TimeoutError("the network timeout passed") from exc


def command_sets(body: bytearray, pending: list[bytes], during: str) -> list[bytes]:
    """The command sets a P-DATA-TF completes while an operation runs, when only commands may
    come (responses, C-CANCEL); ``pending`` keeps the fragments of one still arriving."""
    completed = []
    for _context_id, control, fragment in pdvs(body):
        if not control & COMMAND:
            raise ProtocolError(f"a data set arrived during {during}", UNEXPECTED_PDU)
        pending.append(bytes(fragment))
        if control & LAST_FRAGMENT:
            completed.append(b"".join(pending))
            pending.clear()
    return completed


def pdvs(body: bytearray) -> Iterator[tuple[int, int, memoryview]]:
    """The presentation data values of a P-DATA-TF body: ``(context ID, message control
    header, fragment)`` (PS3.8 Section 9.3.5.1)."""
    view = memoryview(body)
    offset, end = 0, len(view)
    while offset < end:
        if end - offset < 6:
            raise ProtocolError("P-DATA-TF ends inside a presentation data value header")
        length, context_id, control = _PDV_HEADER.unpack_from(view, offset)
        if length < 2 or length > end - offset - 4:
            raise ProtocolError(f"presentation data value length {length} is invalid")
        yield context_id, control, view[offset + 6:offset + 4 + length]
        offset += 4 + length


def p_data_pdus(context_id: int, is_command: bool, payload: bytes | bytearray | memoryview,
                max_pdu_length: int) -> Iterator[bytes | memoryview]:
    """The P-DATA-TF PDUs carrying one command set or data set, one fragment per PDU, each
    within the peer's Maximum Length (0: unlimited, PS3.8 Annex D.1)."""
    control = COMMAND if is_command else 0
    # A PDU's Maximum Length counts its PDVs; each carries a 6-byte item header.
    fragment_size = max(max_pdu_length - 6, 1) if max_pdu_length else max(len(payload), 1)
    view = memoryview(payload)
    total = len(view)
    offset = 0
    while True:
        fragment = view[offset:offset + fragment_size]
        offset += len(fragment)
        last = offset >= total
        flags = control | (LAST_FRAGMENT if last else 0)
        pdv_length = len(fragment) + 2
        yield (_PDU_HEADER.pack(P_DATA_TF, pdv_length + 4)
               + _PDV_HEADER.pack(pdv_length, context_id, flags))
        if len(fragment):
            yield fragment
        if last:
            return


def send_message(sock: socket.socket, context_id: int, command: bytes,
                 data_set: bytes | bytearray | memoryview | None, max_pdu_length: int) -> None:
    """Send a command set (and its data set) with as few system calls as the PDUs allow."""
    parts: list[bytes | memoryview] = list(p_data_pdus(context_id, True, command, max_pdu_length))
    if data_set is not None:
        parts.extend(p_data_pdus(context_id, False, data_set, max_pdu_length))
    sendmsg_all(sock, parts)


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Write a last PDU (an A-ABORT) to a peer that may be gone."""
    try:
        sock.sendall(data)
    except OSError:
        pass


def close(sock: socket.socket) -> None:
    """Shut the connection down both ways and close it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def sendmsg_all(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    """Write every part, gathered (``sendmsg``) in batches the kernel accepts; over TLS, which
    has no ``sendmsg``, joined and written at once."""
    if isinstance(sock, ssl.SSLSocket):
        sock.sendall(b"".join(parts))
        return
    batch = 512  # below IOV_MAX (1024 on Linux)
    for start in range(0, len(parts), batch):
        chunk = [memoryview(p) for p in parts[start:start + batch]]
        remaining = sum(len(c) for c in chunk)
        while remaining:
            sent = _timed(sock.sendmsg, chunk)
            remaining -= sent
            if not remaining:
                break
            # Drop what was written and retry with the rest.
            while sent:
                if sent >= len(chunk[0]):
                    sent -= len(chunk[0])
                    chunk.pop(0)
                else:
                    chunk[0] = chunk[0][sent:]
                    sent = 0
