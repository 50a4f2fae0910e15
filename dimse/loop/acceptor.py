"""Associations the gateway runs itself, without pynetdicom's DUL (PS3.7, PS3.8; PS3.4 Annexes
A, B and C.4).

pynetdicom runs each association with a reactor thread polling its queues every millisecond and
decodes every P-DATA-TF into objects passed between threads; per message that cost more CPU than
storing an instance or answering a query match. Associations over plain TCP (modalities and
PACS pushing studies, workstations querying and retrieving) are run here, in the connection's
own thread, with blocking reads:

- the A-ASSOCIATE-RQ is *peeked* (``MSG_PEEK``): an association proposing user identity or
  SOP class extended negotiation, or arriving over TLS, is left untouched to pynetdicom
  (:mod:`dimse.scp`), which reads it as if nothing happened;
- A-ASSOCIATE PDUs are decoded and encoded by pynetdicom, presentation contexts negotiated by
  its :func:`~pynetdicom.presentation.negotiate_as_acceptor`, with the same supported contexts,
  peer rules, called-AE check and association limit as the pynetdicom path; the outcome is
  kept for the next association that proposes the same (:mod:`dimse.loop.negotiation`);
- P-DATA-TF PDUs are read straight off the socket and each complete message is answered by the
  same service functions the pynetdicom path uses: :func:`dimse.services.store.store_instance`,
  :func:`dimse.services.find.find_responses`, and for C-MOVE and C-GET the decisions of
  :mod:`dimse.services.retrieve` with the sub-operations sent by :mod:`dimse.loop.retrieve`
  (C-GET sub-operations go back on the same association, over the
  contexts where SCP/SCU role selection made the peer the Storage SCP); a C-CANCEL is looked
  for between two responses without blocking.
"""

from __future__ import annotations

import io
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import PresentationContext

from dimse.loop import command_set, upper_layer
from dimse.loop.command_set import C_CANCEL_RQ, CommandSetError
from dimse.loop.negotiation import Negotiated, Negotiations, ae_titles, negotiate
from dimse.loop.retrieve import Progress, get_progress, move_progress
from dimse.loop.storage_scu import encoded_for_peer
from dimse.peers import PeerPolicy
from dimse.services.find import as_dataset, find_responses
from dimse.services.identifier import encode_identifier
from dimse.services.store import record_association, store_instance
from dimse.status import (
    INVALID_ARGUMENT_VALUE,
    NOT_AUTHORIZED,
    OUT_OF_RESOURCES,
    PENDING,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
    UNRECOGNIZED_OPERATION,
)
from dimse.transport import tune_socket, use_kernel_timeouts
from gateway.audit import StoredInstances
from gateway.core import Gateway
from gateway.metrics import METRICS

logger = logging.getLogger(__name__)

# The SOP classes on whose contexts each request may come (PS3.4 C.6.1, C.6.2; A; B).
QUERY_RETRIEVE = "1.2.840.10008.5.1.4.1.2."  # + 1 Patient Root / 2 Study Root, . FIND/MOVE/GET
SERVICE_SOP_CLASSES = {
    command_set.C_ECHO_RQ: frozenset({"1.2.840.10008.1.1"}),
    command_set.C_FIND_RQ: frozenset({f"{QUERY_RETRIEVE}1.1", f"{QUERY_RETRIEVE}2.1"}),
    command_set.C_MOVE_RQ: frozenset({f"{QUERY_RETRIEVE}1.2", f"{QUERY_RETRIEVE}2.2"}),
    command_set.C_GET_RQ: frozenset({f"{QUERY_RETRIEVE}1.3", f"{QUERY_RETRIEVE}2.3"}),
}
NOT_STORAGE = frozenset().union(*SERVICE_SOP_CLASSES.values())
KNOWN_REQUESTS = frozenset({*SERVICE_SOP_CLASSES, command_set.C_STORE_RQ})


def serves(command_field: int, abstract_syntax: str) -> bool:
    """Whether a request of this kind may come on a context of this SOP class."""
    if command_field == command_set.C_STORE_RQ:
        return abstract_syntax not in NOT_STORAGE
    return abstract_syntax in SERVICE_SOP_CLASSES.get(command_field, frozenset())
# A-ASSOCIATE-RJ (result, source, reason), PS3.8 Section 9.3.4.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
# An A-ASSOCIATE-RQ larger than this is left to pynetdicom (128 contexts fit well within it).
MAX_PEEKED_REQUEST = 1 << 20
# No PDU the peer sends may exceed this, whatever Maximum Length it was told.
PDU_LENGTH_CEILING = 64 << 20


class Incomplete(Exception):
    """A new connection closed, or sent no whole A-ASSOCIATE-RQ before its deadline."""


def peek_associate_request(sock: socket.socket, timeout: float) -> bytes | None:
    """The A-ASSOCIATE-RQ PDU waiting on a new connection, read without consuming it; ``None``
    when what waits is not one we peek (pynetdicom then reads and answers it).

    The socket blocks, timed out by the kernel (``SO_RCVTIMEO``), and ``MSG_WAITALL`` makes
    each peek wait for the bytes asked (the PDU header, then the PDU) with no polling: a
    connection sending part of a request costs nothing while it waits.

    Raises
    ------
    Incomplete
        When the peer closed the connection, or the request was not whole within ``timeout``
        seconds (PS3.8 9.1.5, the ARTIM timer): the caller closes the connection.
    """
    deadline = time.monotonic() + timeout
    wanted = 6
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Incomplete(f"no whole A-ASSOCIATE-RQ within {timeout} s")
            use_kernel_timeouts(sock, left)
            data = sock.recv(wanted, socket.MSG_PEEK | socket.MSG_WAITALL)
            if data and data[0] != upper_layer.A_ASSOCIATE_RQ:
                return None
            if len(data) < wanted:  # closed by the peer, or timed out with part of it
                raise Incomplete(f"{len(data)} bytes of an A-ASSOCIATE-RQ, then "
                                 + ("nothing" if time.monotonic() < deadline else "the deadline"))
            if wanted == 6:
                length = struct.unpack(">I", data[2:6])[0]
                if length > MAX_PEEKED_REQUEST:
                    return None
                wanted = 6 + length
                continue
            return data
    except (BlockingIOError, TimeoutError):
        raise Incomplete(f"no whole A-ASSOCIATE-RQ within {timeout} s") from None
    except OSError as exc:
        raise Incomplete(f"connection failed: {exc}") from None


class PendingRequests:
    """Connections still sending their A-ASSOCIATE-RQ: ``[dimse] max_pending_associations``
    overall and ``max_pending_per_address`` per source address."""

    def __init__(self, limit: int, per_address: int) -> None:
        self.limit = limit
        self.per_address = per_address
        self._lock = threading.Lock()
        self._count = 0
        self._by_address: dict[str, int] = {}

    def enter(self, address: str) -> bool:
        with self._lock:
            mine = self._by_address.get(address, 0)
            if self._count >= self.limit or mine >= self.per_address:
                return False
            self._count += 1
            self._by_address[address] = mine + 1
            return True

    def leave(self, address: str) -> None:
        with self._lock:
            self._count -= 1
            mine = self._by_address.pop(address) - 1
            if mine:
                self._by_address[address] = mine


@dataclass
class Association:
    """One association run here: its socket, peer and negotiated contexts."""

    sock: socket.socket
    reader: upper_layer.PduReader
    host: str
    calling_ae_title: str
    # context ID -> (abstract syntax, transfer syntax)
    contexts: dict[int, tuple[str, str]]
    peer_max_pdu: int
    # The accepted contexts with the roles negotiated (C-GET sends where as_scu is true).
    accepted: list[PresentationContext] = field(default_factory=list)
    # A C-CANCEL-RQ read while an operation was running, by Message ID Being Responded To.
    cancelled: set[int] = field(default_factory=set)
    # The fragments of a command set still arriving while an operation runs.
    pending_command: list[bytes] = field(default_factory=list)
    # What C-STORE stored here, for the trail entry written when the association ends.
    stored: StoredInstances = field(default_factory=StoredInstances)

    def send(self, context_id: int, command: bytes,
             data_set: bytes | bytearray | memoryview | None = None) -> None:
        upper_layer.send_message(self.sock, context_id, command, data_set, self.peer_max_pdu)

    def commands(self, during: str) -> list[dict[int, bytes]]:
        """Read one PDU while an operation runs, when only command sets may come (responses,
        C-CANCEL): the ones it completes."""
        pdu_type, body = self.reader.read_pdu(PDU_LENGTH_CEILING)
        if pdu_type == upper_layer.A_ABORT:
            raise upper_layer.PeerClosed("the peer aborted the association")
        if pdu_type != upper_layer.P_DATA_TF:
            raise upper_layer.ProtocolError(f"PDU type 0x{pdu_type:02X} during {during}",
                                            upper_layer.UNEXPECTED_PDU)
        return [command_set.decode(encoded) for encoded
                in upper_layer.command_sets(body, self.pending_command, during)]

    def note_cancel(self, command: dict[int, bytes]) -> bool:
        """Record a C-CANCEL-RQ (by the Message ID it cancels); ``False`` if it is not one."""
        if command_set.us(command, command_set.COMMAND_FIELD) != C_CANCEL_RQ:
            return False
        answered = command_set.us(command, command_set.MESSAGE_ID_BEING_RESPONDED_TO)
        if answered is not None:
            self.cancelled.add(answered)
        return True

    def cancel_requested(self, message_id: int) -> bool:
        """Whether the peer sent a C-CANCEL for this operation: reads, without waiting, what
        has arrived since the operation began (PS3.7 9.3.2.3, 9.3.4.3)."""
        while message_id not in self.cancelled:
            if not self.reader.buffered():
                readable, _, _ = select.select([self.sock], [], [], 0)
                if not readable:
                    return False
            for command in self.commands("an operation"):
                if not self.note_cancel(command):
                    raise upper_layer.ProtocolError(
                        "only a C-CANCEL may arrive while an operation is running "
                        "(no asynchronous operations were negotiated)",
                        upper_layer.UNEXPECTED_PDU)
        return True


class SameAssociationStore:
    """The C-STORE sub-operations of a C-GET, sent back on the C-GET's own association
    (PS3.4 C.4.3.3) over the contexts where the peer took the Storage SCP role; what
    :func:`dimse.loop.retrieve.sub_operations` calls ``send_c_store`` on."""

    def __init__(self, assoc: Association, get_message_id: int) -> None:
        self.assoc = assoc
        self.get_message_id = get_message_id
        self.contexts = [cx for cx in assoc.accepted if cx.as_scu]

    def send_c_store(self, dataset: Dataset, msg_id: int = 1, **_: Any) -> Dataset:
        sop_class = str(dataset.SOPClassUID)
        context_id, payload = encoded_for_peer(dataset, sop_class, self.contexts)
        self.assoc.send(context_id, command_set.store_request(
            sop_class, str(dataset.SOPInstanceUID), msg_id), payload)
        status = Dataset()
        status.Status = self._response_status(msg_id)
        return status

    def _response_status(self, msg_id: int) -> int:
        """Read until the C-STORE-RSP to ``msg_id``; a C-CANCEL of the C-GET arriving
        meanwhile is noted for the next check."""
        status = None
        while status is None:
            for command in self.assoc.commands("a C-GET"):
                if self.assoc.note_cancel(command):
                    continue
                if command_set.us(command, command_set.COMMAND_FIELD) == \
                        command_set.C_STORE_RSP and command_set.us(
                            command, command_set.MESSAGE_ID_BEING_RESPONDED_TO) == msg_id:
                    status = command_set.us(command, command_set.STATUS) or 0
                else:
                    raise upper_layer.ProtocolError(
                        "only C-STORE responses and C-CANCEL may arrive during a C-GET",
                        upper_layer.UNEXPECTED_PDU)
        return status

    def release(self) -> None:
        """Nothing to release: the association is the C-GET's own."""


class AssociationSlots:
    """The ``[dimse] max_associations`` limit, shared by this module's associations and
    pynetdicom's."""

    def __init__(self, ae: Any, limit: int) -> None:
        self._ae = ae
        self._limit = limit
        self._lock = threading.Lock()
        self._ours = 0

    def acquire(self) -> bool:
        with self._lock:
            theirs = sum(1 for a in self._ae.active_associations if a.is_acceptor)
            if self._ours + theirs >= self._limit:
                return False
            self._ours += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._ours -= 1

    def ours(self) -> int:
        """How many associations this module runs now."""
        return self._ours


class Acceptor:
    """Takes the associations it can run off pynetdicom's hands (see the module docstring).

    Parameters
    ----------
    gateway
        The core: settings, ingestor, index.
    policy
        Which peers may echo, store, find and move.
    ae
        The gateway's pynetdicom Application Entity (:class:`dimse.scp.GatewayAE`): its
        supported presentation contexts, its active associations (counted against the shared
        limit), and its ``associate`` for the sub-associations of C-MOVE.
    """

    def __init__(self, gateway: Gateway, policy: PeerPolicy, ae: Any) -> None:
        self.gateway = gateway
        self.policy = policy
        self.ae = ae
        self.settings = gateway.settings.dimse
        self.supported: list[PresentationContext] = list(ae.supported_contexts)
        max_pdu = self.settings.max_pdu_size
        self.negotiations = Negotiations(
            lambda request: negotiate(request, self.supported, max_pdu))
        self.slots = AssociationSlots(ae, self.settings.max_associations)
        self.pending = PendingRequests(self.settings.max_pending_associations,
                                       self.settings.max_pending_per_address)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def close_all(self) -> None:
        """Stop reading on every association run here (server shutdown): each ends once the
        message it is answering, if any, is answered."""
        with self._open_lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass

    def take(self, sock: socket.socket, address: tuple[str, int] | str) -> bool:
        """Run the association on ``sock`` here if it can be; ``False`` leaves the connection,
        unread, to pynetdicom. Returns once the association ended."""
        if not isinstance(sock, socket.socket) or hasattr(sock, "pending"):  # TLS
            return False
        tune_socket(sock)
        host = address[0] if isinstance(address, tuple) else str(address)
        if not self.pending.enter(host):
            logger.warning("closed a connection from %s: %d connections (%d from there) are "
                           "already sending an A-ASSOCIATE-RQ", host, self.pending.limit,
                           self.pending.per_address)
            METRICS.inc("gateway_dimse_associations_rejected_total")
            upper_layer.send_quietly(sock, upper_layer.reject_pdu(*REJECT_LOCAL_LIMIT))
            upper_layer.close(sock)
            return True
        with self._open_lock:
            self._open.add(sock)  # a server shutdown ends the wait
        try:
            peeked = peek_associate_request(sock, self.settings.association_request_timeout)
        except Incomplete as exc:
            logger.debug("closed a connection from %s: %s", host, exc)
            upper_layer.close(sock)
            return True
        finally:
            self.pending.leave(host)
            with self._open_lock:
                self._open.discard(sock)
        if peeked is None:
            return self._leave_to_pynetdicom(sock)
        titles = ae_titles(peeked)
        try:
            negotiated = self.negotiations.get(peeked) if titles is not None else None
        except Exception as exc:  # malformed past what pynetdicom answers, or a defect
            if isinstance(exc, upper_layer.ProtocolError):
                logger.warning("A-ASSOCIATE-RQ from %s aborted: %s", host, exc)
                reason = exc.reason
            else:
                logger.exception("A-ASSOCIATE-RQ from %s aborted after an unexpected error",
                                 host)
                reason = upper_layer.REASON_NOT_SPECIFIED
            upper_layer.send_quietly(sock, upper_layer.abort_pdu(
                upper_layer.SERVICE_PROVIDER, reason))
            upper_layer.close(sock)
            return True
        if titles is None or negotiated is None:
            return self._leave_to_pynetdicom(sock)
        use_kernel_timeouts(sock, self.settings.network_timeout)
        with self._open_lock:
            self._open.add(sock)
        try:
            reader = upper_layer.PduReader(sock)
            reader.read_pdu(MAX_PEEKED_REQUEST)  # the request peeked: now consume it
            self._run(sock, reader, host, titles, negotiated.accept_pdu_for(peeked),
                      negotiated)
        except (upper_layer.PeerClosed, OSError) as exc:
            logger.debug("association from %s ended: %s", host, exc)
        except Exception:  # a defect: logged, the peer told by an A-ABORT, the server goes on
            logger.exception("association from %s aborted after an unexpected error", host)
            upper_layer.send_quietly(sock, upper_layer.abort_pdu())
        finally:
            with self._open_lock:
                self._open.discard(sock)
            upper_layer.close(sock)
        return True

    def _leave_to_pynetdicom(self, sock: socket.socket) -> bool:
        """Give the connection back as pynetdicom expects it: no kernel timeouts, Python's."""
        use_kernel_timeouts(sock, 0.0, clear=True)
        sock.settimeout(self.settings.network_timeout)
        return False

    def _run(self, sock: socket.socket, reader: upper_layer.PduReader, host: str,
             titles: tuple[str, str], accept_pdu: bytes, negotiated: Negotiated) -> None:
        called, calling = titles
        rejection = None
        if self.settings.require_called_ae and called != self.settings.ae_title.strip():
            logger.warning("rejected association from %s at %s: called AE title %r is not %r",
                           calling, host, called, self.settings.ae_title)
            rejection = REJECT_CALLED_AE
        elif not self.policy.allows_anything(calling, host):
            logger.warning("rejected association from %s at %s: peer not allowed", calling, host)
            rejection = REJECT_CALLING_AE
        elif not self.slots.acquire():
            logger.warning("rejected association from %s at %s: %d associations already",
                           calling, host, self.settings.max_associations)
            rejection = REJECT_LOCAL_LIMIT
        if rejection is not None:
            METRICS.inc("gateway_dimse_associations_rejected_total")
            sock.sendall(upper_layer.reject_pdu(*rejection))
            return
        try:
            assoc = Association(sock, reader, host, calling, negotiated.contexts,
                                negotiated.peer_max_pdu, list(negotiated.accepted))
            sock.sendall(accept_pdu)
            METRICS.inc("gateway_dimse_associations_total")
            logger.info("association from %s at %s accepted", calling, host)
            try:
                self._serve(assoc)
            finally:
                record_association(self.gateway, assoc.stored, calling, host)
        finally:
            self.slots.release()

    def _serve(self, assoc: Association) -> None:
        """Read PDUs until release or abort; answer each complete message."""
        max_pdu = self.settings.max_pdu_size
        ceiling = max(max_pdu, PDU_LENGTH_CEILING)
        command_fragments = assoc.pending_command  # shared with cancel_requested()
        command: dict[int, bytes] | None = None
        command_context = 0
        data_fragments: list[bytes | memoryview] = []
        data_size = 0  # bytes of the data set arriving; past the limit they are dropped
        limit = self.settings.max_data_set_bytes
        sock = assoc.sock
        try:
            while True:
                pdu_type, body = assoc.reader.read_pdu(ceiling)
                if pdu_type == upper_layer.P_DATA_TF:
                    for context_id, control, fragment in upper_layer.pdvs(body):
                        if context_id not in assoc.contexts:
                            raise upper_layer.ProtocolError(
                                f"presentation context {context_id} was not accepted")
                        if control & upper_layer.COMMAND:
                            if command is not None:
                                raise upper_layer.ProtocolError(
                                    "a command arrived before the previous data set ended")
                            command_fragments.append(bytes(fragment))
                            if not control & upper_layer.LAST_FRAGMENT:
                                continue
                            command = command_set.decode(b"".join(command_fragments))
                            command_fragments.clear()
                            command_context = context_id
                            if command_set.us(command, command_set.COMMAND_DATA_SET_TYPE) \
                                    == command_set.NO_DATA_SET:
                                self._answer(assoc, command_context, command, None)
                                command = None
                        else:
                            if command is None or context_id != command_context:
                                raise upper_layer.ProtocolError(
                                    "a data set fragment arrived without its command")
                            data_size += len(fragment)
                            if data_size <= limit:
                                data_fragments.append(fragment)
                            elif data_fragments:
                                data_fragments = []  # drop what arrived; refused at the end
                            if control & upper_layer.LAST_FRAGMENT:
                                if data_size <= limit:
                                    self._answer(assoc, command_context, command,
                                                 data_fragments)
                                else:
                                    self._refuse_oversized(assoc, command_context, command,
                                                           data_size)
                                command = None
                                data_fragments = []
                                data_size = 0
                elif pdu_type == upper_layer.A_RELEASE_RQ:
                    sock.sendall(upper_layer.RELEASE_RP_PDU)
                    logger.debug("association from %s at %s released", assoc.calling_ae_title,
                                 assoc.host)
                    return
                elif pdu_type == upper_layer.A_ABORT:
                    logger.info("association from %s at %s aborted by the peer",
                                assoc.calling_ae_title, assoc.host)
                    return
                elif pdu_type in upper_layer.PDU_TYPES:
                    raise upper_layer.ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}",
                                                    upper_layer.UNEXPECTED_PDU)
                else:
                    raise upper_layer.ProtocolError(f"unrecognised PDU type 0x{pdu_type:02X}",
                                                    upper_layer.UNRECOGNIZED_PDU)
        except (upper_layer.ProtocolError, CommandSetError) as exc:
            reason = getattr(exc, "reason", upper_layer.INVALID_PDU_PARAMETER)
            logger.warning("aborting the association from %s at %s: %s",
                           assoc.calling_ae_title, assoc.host, exc)
            upper_layer.send_quietly(
                sock, upper_layer.abort_pdu(upper_layer.SERVICE_PROVIDER, reason))
        except TimeoutError:
            logger.warning("aborting the association from %s at %s: nothing received for %s s",
                           assoc.calling_ae_title, assoc.host, self.settings.network_timeout)
            upper_layer.send_quietly(sock, upper_layer.abort_pdu())

    def _answer(self, assoc: Association, context_id: int, command: dict[int, bytes],
                data_fragments: list[bytes | memoryview] | None) -> None:
        command_field = command_set.us(command, command_set.COMMAND_FIELD)
        message_id = command_set.us(command, command_set.MESSAGE_ID)
        if command_field == C_CANCEL_RQ:
            return  # nothing running to cancel
        if command_field is None or message_id is None:
            raise upper_layer.ProtocolError("command set without Command Field or Message ID")
        sop_class = command_set.text(command, command_set.AFFECTED_SOP_CLASS_UID) or ""
        abstract_syntax, transfer_syntax = assoc.contexts[context_id]
        if command_field not in KNOWN_REQUESTS or not serves(command_field, abstract_syntax):
            # N-GET and the other DIMSE-N requests name a Requested SOP Class (PS3.7 10.1).
            sop_class = sop_class or command_set.text(
                command, command_set.REQUESTED_SOP_CLASS_UID) or abstract_syntax
            assoc.send(context_id, command_set.response(
                (command_field | 0x8000) & 0xFFFF, sop_class, message_id,
                UNRECOGNIZED_OPERATION))
            return
        if sop_class != abstract_syntax:
            assoc.send(context_id, command_set.response(
                (command_field | 0x8000) & 0xFFFF, sop_class, message_id,
                SOP_CLASS_NOT_SUPPORTED,
                error_comment=f"context {context_id} was negotiated for another SOP class"))
            return
        if command_field == command_set.C_ECHO_RQ:
            allowed = self.policy.allows("echo", assoc.calling_ae_title, assoc.host)
            assoc.send(context_id, command_set.echo_response(
                sop_class, message_id, SUCCESS if allowed else NOT_AUTHORIZED))
        elif command_field == command_set.C_STORE_RQ and data_fragments is not None:
            sop_instance = command_set.text(command, command_set.AFFECTED_SOP_INSTANCE_UID) or ""
            status, comment = store_instance(
                self.gateway, self.policy, assoc.calling_ae_title, assoc.host, sop_class,
                sop_instance, transfer_syntax, data_fragments, assoc.stored)
            assoc.send(context_id, command_set.store_response(
                sop_class, sop_instance, message_id, status, comment))
        elif command_field == command_set.C_FIND_RQ and data_fragments is not None:
            self._find(assoc, context_id, sop_class, message_id, transfer_syntax,
                       data_fragments)
        elif command_field == command_set.C_GET_RQ and data_fragments is not None:
            self._get(assoc, context_id, sop_class, message_id, transfer_syntax,
                      data_fragments)
        elif command_field == command_set.C_MOVE_RQ and data_fragments is not None:
            destination = command_set.text(command, command_set.MOVE_DESTINATION) or ""
            self._move(assoc, context_id, sop_class, message_id, transfer_syntax,
                       data_fragments, destination)
        else:  # a C-STORE, C-FIND or C-MOVE request without its data set
            assoc.send(context_id, command_set.response(
                (command_field | 0x8000) & 0xFFFF, sop_class, message_id,
                INVALID_ARGUMENT_VALUE, error_comment="the request has no data set"))

    def _refuse_oversized(self, assoc: Association, context_id: int,
                          command: dict[int, bytes], size: int) -> None:
        """Answer a request whose data set exceeded ``[dimse] max_data_set_bytes`` (and was
        dropped as it arrived): 0xA700, out of resources (PS3.4 B.2.3)."""
        command_field = command_set.us(command, command_set.COMMAND_FIELD) or 0
        message_id = command_set.us(command, command_set.MESSAGE_ID) or 0
        sop_class = command_set.text(command, command_set.AFFECTED_SOP_CLASS_UID) or ""
        sop_instance = command_set.text(command, command_set.AFFECTED_SOP_INSTANCE_UID) or ""
        comment = f"data set of {size} bytes exceeds the limit"
        logger.warning("refused a data set of %d bytes from %s at %s (instance %s): over "
                       "[dimse] max_data_set_bytes", size, assoc.calling_ae_title, assoc.host,
                       sop_instance)
        if command_field == command_set.C_STORE_RQ:
            response = command_set.store_response(sop_class, sop_instance, message_id,
                                                  OUT_OF_RESOURCES, comment)
        else:
            response = command_set.response((command_field | 0x8000) & 0xFFFF, sop_class,
                                            message_id, OUT_OF_RESOURCES, error_comment=comment)
        assoc.send(context_id, response)

    def _find(self, assoc: Association, context_id: int, sop_class: str, message_id: int,
              transfer_syntax: str, data_fragments: list[bytes | memoryview]) -> None:
        """C-FIND: a C-FIND-RSP per :func:`dimse.services.find.find_responses` answer."""
        syntax = UID(transfer_syntax)
        responses = find_responses(
            self.gateway, self.policy, assoc.calling_ae_title, assoc.host, sop_class,
            lambda: _decoded(data_fragments, syntax),
            lambda: assoc.cancel_requested(message_id))
        direct = syntax.is_little_endian and not syntax.is_deflated
        for status, identifier in responses:
            encoded = None
            if identifier is not None:
                encoded = encode_identifier(identifier, implicit_vr=syntax.is_implicit_VR) \
                    if direct else None
                if encoded is None:
                    encoded = _encoded(as_dataset(identifier), syntax)
            assoc.send(context_id, command_set.response(
                command_set.C_FIND_RSP, sop_class, message_id, status,
                data_set=encoded is not None), encoded)
        assoc.cancelled.discard(message_id)

    def _move(self, assoc: Association, context_id: int, sop_class: str, message_id: int,
              transfer_syntax: str, data_fragments: list[bytes | memoryview],
              destination: str) -> None:
        """C-MOVE: a C-MOVE-RSP per :func:`dimse.loop.retrieve.move_progress` step."""
        syntax = UID(transfer_syntax)
        steps = move_progress(
            self.gateway, self.policy, assoc.calling_ae_title, assoc.host, destination,
            sop_class, message_id, lambda: _decoded(data_fragments, syntax),
            lambda: assoc.cancel_requested(message_id), self.ae.associate)
        self._retrieve_responses(assoc, context_id, sop_class, message_id, syntax, steps,
                                 command_set.C_MOVE_RSP)

    def _get(self, assoc: Association, context_id: int, sop_class: str, message_id: int,
             transfer_syntax: str, data_fragments: list[bytes | memoryview]) -> None:
        """C-GET: the instances go back on this association, a C-GET-RSP per
        :func:`dimse.loop.retrieve.get_progress` step."""
        syntax = UID(transfer_syntax)
        store = SameAssociationStore(assoc, message_id)
        steps = get_progress(
            self.gateway, self.policy, assoc.calling_ae_title, assoc.host, sop_class,
            lambda: _decoded(data_fragments, syntax),
            lambda: assoc.cancel_requested(message_id), store, store.contexts)
        self._retrieve_responses(assoc, context_id, sop_class, message_id, syntax, steps,
                                 command_set.C_GET_RSP)

    @staticmethod
    def _retrieve_responses(assoc: Association, context_id: int, sop_class: str,
                            message_id: int, syntax: UID, steps: Iterator[Progress],
                            response_field: int) -> None:
        """A response per step; the final one lists the failed SOP Instance UIDs (PS3.4
        C.4.2.1.4.2, C.4.3.1.3.2)."""
        for progress in steps:
            encoded = None
            if progress.status != PENDING and progress.failed_uids:
                failed = Dataset()
                failed.FailedSOPInstanceUIDList = progress.failed_uids
                encoded = _encoded(failed, syntax)
            assoc.send(context_id, command_set.response(
                response_field, sop_class, message_id, progress.status,
                data_set=encoded is not None, counts=progress.counts), encoded)
        assoc.cancelled.discard(message_id)


def _decoded(fragments: list[bytes | memoryview], syntax: UID) -> Dataset:
    """A request's identifier, decoded in its context's transfer syntax."""
    return decode(io.BytesIO(b"".join(fragments)), syntax.is_implicit_VR,
                  syntax.is_little_endian, syntax.is_deflated)


def _encoded(identifier: Dataset, syntax: UID) -> bytes:
    """A response identifier, encoded in its context's transfer syntax."""
    encoded = encode(identifier, syntax.is_implicit_VR, syntax.is_little_endian,
                     syntax.is_deflated)
    if encoded is None:
        raise upper_layer.ProtocolError("a response identifier could not be encoded",
                                        upper_layer.REASON_NOT_SPECIFIED)
    return encoded
