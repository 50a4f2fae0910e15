"""Storage associations the gateway requests (C-MOVE sub-operations), without pynetdicom's DUL.

pynetdicom's C-MOVE SCP opens the association to the move destination with
``AE.associate`` and sends each instance with ``send_c_store``; the gateway's AE
(:class:`dimse.scp.GatewayAE`) answers ``associate`` with a :class:`StorageRequestor` instead
of a pynetdicom ``Association``, over TCP or TLS. It offers what
the C-MOVE SCP uses (``is_established``, ``accepted_contexts``, ``send_c_store``,
``release``) and sends a stored file's data set as it is on disk when the destination accepted
its transfer syntax: no decoding, no re-encoding, one gathered write per message.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from types import SimpleNamespace
from typing import Any

from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom._globals import APPLICATION_CONTEXT_NAME
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_AC as AssociateAcPDU
from pynetdicom.pdu import A_ASSOCIATE_RJ as AssociateRjPDU
from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRqPDU
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_requestor

from dimse.loop import command_set, upper_layer
from dimse.loop.negotiation import own_user_information
from dimse.services.retrieve import StoredFile
from dimse.transport import tune_socket
from gateway.metadata import dataset_offset

logger = logging.getLogger(__name__)

# Largest response PDU accepted from the destination.
MAX_RESPONSE_PDU = 1 << 20


class StorageRequestor:
    """One association to a Storage SCP, run in the calling thread with blocking I/O.

    Use :meth:`open`; it returns a requestor whose ``is_established`` tells whether the peer
    accepted (a rejected or unreachable peer gives ``False``, as pynetdicom does).
    """

    def __init__(self, sock: socket.socket | None, contexts: list[PresentationContext],
                 peer_max_pdu: int, timeout: float,
                 reader: upper_layer.PduReader | None = None) -> None:
        self._sock = sock
        self._reader = reader
        self._pending_command: list[bytes] = []
        self.accepted_contexts = [cx for cx in contexts if cx.result == 0x00]
        self.rejected_contexts = [cx for cx in contexts if cx.result != 0x00]
        self.peer_max_pdu = peer_max_pdu
        self.timeout = timeout
        self.is_established = sock is not None
        # The AE title that sub-operations name as their Move Originator when the caller's is
        # not the requestor's (pynetdicom's C-MOVE SCP passes the gateway's own).
        self.move_originator: str | None = None
        # pynetdicom's C-MOVE SCP closes ``dul.socket`` of an association that failed.
        self.dul = SimpleNamespace(socket=self)

    @classmethod
    def open(cls, host: str, port: int, *, calling_ae_title: str, called_ae_title: str,
             contexts: list[PresentationContext], max_pdu: int, timeout: float,
             tls: tuple[ssl.SSLContext, str] | None = None) -> StorageRequestor:
        """Connect (with ``tls``: TLS, PS3.15 B.1, the peer's certificate checked for the
        given host name), request the association, and return the requestor."""
        for number, context in enumerate(contexts):
            context.context_id = 2 * number + 1
        request = A_ASSOCIATE()
        request.application_context_name = UID(APPLICATION_CONTEXT_NAME)
        request.calling_ae_title = calling_ae_title
        request.called_ae_title = called_ae_title
        request.presentation_context_definition_list = contexts
        request.user_information = [*own_user_information(max_pdu)]
        pdu = AssociateRqPDU()
        pdu.from_primitive(request)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            tune_socket(sock)
            if tls is not None:
                tls_context, server_hostname = tls
                sock = tls_context.wrap_socket(sock, server_hostname=server_hostname)
        except (OSError, ssl.SSLError) as exc:
            logger.warning("cannot connect to %s at %s:%s: %s", called_ae_title, host, port, exc)
            return cls(None, [], 0, timeout)
        reader = upper_layer.PduReader(sock, 64 * 1024)
        try:
            sock.sendall(pdu.encode())
            pdu_type, body = reader.read_pdu(MAX_RESPONSE_PDU)
            header = bytes([pdu_type, 0]) + len(body).to_bytes(4, "big")
            if pdu_type == upper_layer.A_ASSOCIATE_RJ:
                rejection = AssociateRjPDU()
                rejection.decode(header + body)
                logger.warning("%s at %s:%s rejected the association: %s", called_ae_title, host,
                               port, rejection.reason_str)
                upper_layer.close(sock)
                return cls(None, [], 0, timeout)
            if pdu_type != upper_layer.A_ASSOCIATE_AC:
                raise upper_layer.ProtocolError(f"answered with PDU type 0x{pdu_type:02X}")
            accept = AssociateAcPDU()
            accept.decode(header + body)
            reply = accept.to_primitive()
        except (OSError, upper_layer.PeerClosed, upper_layer.ProtocolError, ValueError) as exc:
            logger.warning("association with %s at %s:%s failed: %s", called_ae_title, host,
                           port, exc)
            upper_layer.close(sock)
            return cls(None, [], 0, timeout)
        results = negotiate_as_requestor(contexts,
                                         reply.presentation_context_definition_results_list)
        peer_max = 0
        for item in reply.user_information:
            if isinstance(item, MaximumLengthNotification):
                peer_max = int(item.maximum_length_received or 0)
        return cls(sock, results, peer_max, timeout, reader)

    # -- what pynetdicom's C-MOVE SCP calls ----------------------------------------------------
    def send_c_store(self, dataset: Dataset, msg_id: int = 1,
                     originator_aet: str | None = None, originator_id: int | None = None,
                     **_: Any) -> Dataset:
        """Send one instance; the response's Status (raises when none came, as pynetdicom
        does, which the C-MOVE SCP counts as a failed sub-operation)."""
        if self._sock is None:
            raise RuntimeError("the association is not established")
        sop_class = str(dataset.SOPClassUID)
        sop_instance = str(dataset.SOPInstanceUID)
        context_id, payload = encoded_for_peer(dataset, sop_class, self.accepted_contexts)
        originator = self.move_originator or (
            originator_aet.decode() if isinstance(originator_aet, bytes) else originator_aet)
        command = command_set.store_request(
            sop_class, sop_instance, msg_id, move_originator_ae_title=(originator or "").strip(),
            move_originator_message_id=originator_id)
        upper_layer.send_message(self._sock, context_id, command, payload, self.peer_max_pdu)
        response = self._read_response()
        status = Dataset()
        status.Status = command_set.us(response, command_set.STATUS)
        comment = command_set.text(response, command_set.ERROR_COMMENT)
        if comment:
            status.ErrorComment = comment
        return status

    def release(self) -> None:
        """A-RELEASE (PS3.8 7.2), then close."""
        sock, self._sock = self._sock, None
        self.is_established = False
        if sock is None or self._reader is None:
            return
        try:
            sock.sendall(upper_layer.RELEASE_RQ_PDU)
            while True:
                pdu_type, _ = self._reader.read_pdu(MAX_RESPONSE_PDU)
                if pdu_type in (upper_layer.A_RELEASE_RP, upper_layer.A_ABORT):
                    break
        except (OSError, upper_layer.PeerClosed, upper_layer.ProtocolError):
            pass
        finally:
            upper_layer.close(sock)

    def abort(self) -> None:
        sock, self._sock = self._sock, None
        self.is_established = False
        if sock is not None:
            upper_layer.send_quietly(sock, upper_layer.abort_pdu(upper_layer.SERVICE_USER))
            upper_layer.close(sock)

    def close(self) -> None:
        self.abort()

    # -- internals -----------------------------------------------------------------------------
    def _read_response(self) -> dict[int, bytes]:
        """The next complete command set from the peer (its C-STORE-RSP)."""
        assert self._sock is not None and self._reader is not None
        self._sock.settimeout(self.timeout)
        while True:
            pdu_type, body = self._reader.read_pdu(MAX_RESPONSE_PDU)
            if pdu_type == upper_layer.P_DATA_TF:
                completed = upper_layer.command_sets(body, self._pending_command,
                                                     "a C-STORE sub-operation")
                if completed:
                    return command_set.decode(completed[0])
            elif pdu_type in (upper_layer.A_ABORT, upper_layer.A_RELEASE_RQ):
                self.is_established = False
                raise upper_layer.PeerClosed("the destination ended the association")
            else:
                raise upper_layer.ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")


def encoded_for_peer(dataset: Dataset, sop_class: str,
                     accepted_contexts: list[PresentationContext]
                     ) -> tuple[int, bytes | memoryview]:
    """The context to send ``dataset`` on and its bytes in that context's transfer syntax.

    A :class:`StoredFile` goes as it is on disk when the peer accepted its syntax; a decoded
    data set (decompressed for this peer, or to convert between uncompressed little endian
    syntaxes) is encoded in its own syntax if accepted, else in an uncompressed one.
    """
    by_syntax = {str(cx.transfer_syntax[0]): int(cx.context_id or 0)
                 for cx in accepted_contexts if cx.abstract_syntax == sop_class}
    if not by_syntax:
        raise ValueError(f"the peer accepted no presentation context for {sop_class}")
    stored = getattr(dataset, "stored_path", None)
    if isinstance(dataset, StoredFile) and stored is not None:
        syntax = dataset.stored_transfer_syntax
        if syntax in by_syntax:
            with open(stored, "rb") as f:
                data = f.read()
            offset = dataset_offset(data)
            if not offset:
                raise ValueError(f"{os.fspath(stored)} is not a Part 10 file")
            return by_syntax[syntax], memoryview(data)[offset:]
        raise ValueError(f"the peer did not accept {syntax} for {sop_class}")
    source = UID(str(getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", "")))
    if source in by_syntax:
        target = source
    elif source.is_compressed:
        raise ValueError(f"the peer did not accept {source} for {sop_class}")
    else:
        uncompressed = [UID(s) for s in by_syntax if not UID(s).is_compressed]
        if not uncompressed:
            raise ValueError(f"the peer accepted no uncompressed syntax for {sop_class}")
        target = uncompressed[0]
    encoded = encode(dataset, target.is_implicit_VR, target.is_little_endian,
                     target.is_deflated)
    if encoded is None:
        raise ValueError(f"cannot encode {dataset.SOPInstanceUID} as {target.name}")
    return by_syntax[str(target)], encoded
