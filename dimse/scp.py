"""The gateway's DIMSE Application Entity: C-ECHO and C-STORE SCP (PS3.4 Annexes A and B).

pynetdicom runs each association on its own thread; the handlers call the synchronous core
directly. A C-STORE success is sent only after :meth:`gateway.ingest.Ingestor.ingest` returned,
that is after the file is durable and its index row committed.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Any

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, AllStoragePresentationContexts, build_context, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from dimse.find import handle_find
from dimse.peers import PeerPolicy, is_loopback
from dimse.qr import handle_get, handle_move
from dimse.status import NOT_AUTHORIZED, SUCCESS, store_status
from dimse.transport import install_fast_recv, tune_socket
from gateway.core import Gateway
from gateway.errors import GatewayError
from gateway.metrics import METRICS
from gateway.part10 import file_meta_header

logger = logging.getLogger(__name__)

# Accepted for storage; stored as received (DESIGN.md "Transfer syntaxes").
STORAGE_TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.100",  # MPEG2 Main Profile
    "1.2.840.10008.1.2.4.102",  # MPEG-4 AVC/H.264 High Profile
    "1.2.840.10008.1.2.4.107",  # HEVC/H.265 Main Profile
]

# Query/Retrieve SOP classes (PS3.4 C.6.1 Patient Root, C.6.2 Study Root); identifiers and
# responses are small, so the uncompressed syntaxes are enough.
QUERY_RETRIEVE_FIND = [
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
]
QUERY_RETRIEVE_RETRIEVE = [
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
]
QUERY_TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
]

# A-ASSOCIATE-RJ: rejected-permanent, DUL service user, calling AE title not recognised.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)


def peer_of(event: Any) -> tuple[str, str]:
    """The calling AE title and the address of an event's association."""
    requestor = event.assoc.requestor
    return str(requestor.ae_title).strip(), str(requestor.address)


def handle_open(event: Any) -> None:
    """Tune the new connection's socket before any PDU is read."""
    association_socket = event.assoc.dul.socket
    if association_socket is not None and association_socket.socket is not None:
        tune_socket(association_socket.socket)
        install_fast_recv(association_socket)


def handle_requested(event: Any, policy: PeerPolicy) -> None:
    """Reject an association whose peer may use no service at all; else prefer its syntaxes.

    pynetdicom accepts, for each proposed context, the first syntax of the *acceptor's* list.
    To keep instances as received, this association's list is reordered to follow the order
    the requestor proposed (its preference), keeping only syntaxes the gateway supports.
    """
    ae_title, address = peer_of(event)
    if not policy.allows_anything(ae_title, address):
        logger.warning("rejected association from %s at %s: peer not allowed", ae_title, address)
        METRICS.inc("gateway_dimse_associations_rejected_total")
        event.assoc.acse.send_reject(*REJECT_CALLING_AE)
        return
    prefer_requestor_syntaxes(event.assoc)


def prefer_requestor_syntaxes(assoc: Any) -> None:
    proposed: dict[str, list[str]] = {}
    for context in assoc.requestor.primitive.presentation_context_definition_list:
        # With several contexts for one SOP class, the first proposal wins the ordering.
        proposed.setdefault(str(context.abstract_syntax), [str(t) for t in context.transfer_syntax])
    contexts = []
    for context in assoc.acceptor.supported_contexts:
        wanted = proposed.get(str(context.abstract_syntax))
        if wanted:
            ours = [str(t) for t in context.transfer_syntax]
            ordered = [t for t in wanted if t in ours] + [t for t in ours if t not in wanted]
            reordered = build_context(context.abstract_syntax, ordered)
            # Keep the SCP/SCU role selection the context accepts (C-GET, PS3.7 D.3.3.4).
            reordered.scu_role, reordered.scp_role = context.scu_role, context.scp_role
            context = reordered
        contexts.append(context)
    assoc.acceptor.supported_contexts = contexts


def handle_accepted(event: Any) -> None:
    ae_title, address = peer_of(event)
    METRICS.inc("gateway_dimse_associations_total")
    logger.info("association from %s at %s accepted", ae_title, address)


def handle_echo(event: Any, policy: PeerPolicy) -> int:
    """C-ECHO (PS3.4 Annex A)."""
    ae_title, address = peer_of(event)
    if not policy.allows("echo", ae_title, address):
        return NOT_AUTHORIZED
    return SUCCESS


def handle_store(event: Any, gateway: Gateway, policy: PeerPolicy) -> int:
    """C-STORE (PS3.4 Annex B): keep the data set as received, then answer."""
    ae_title, address = peer_of(event)
    if not policy.allows("store", ae_title, address):
        logger.warning("refused C-STORE from %s at %s: not in the store allow-list",
                       ae_title, address)
        return NOT_AUTHORIZED
    request = event.request
    context = event.context
    try:
        data = file_meta_header(
            str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
            str(context.transfer_syntax), ae_title,
        ) + event.encoded_dataset(include_meta=False)
        result = gateway.ingestor.ingest(
            data,
            source=f"dimse:{ae_title}@{address}",
            expected_sop_class_uid=str(request.AffectedSOPClassUID),
            expected_sop_instance_uid=str(request.AffectedSOPInstanceUID),
        )
    except GatewayError as exc:
        status = store_status(exc)
        METRICS.inc("gateway_instances_rejected_total")
        logger.warning("C-STORE from %s at %s of %s refused with 0x%04X: %s", ae_title, address,
                       request.AffectedSOPInstanceUID, status, exc)
        return status
    except Exception as exc:  # never let an unexpected error kill the association silently
        logger.exception("C-STORE from %s at %s of %s failed", ae_title, address,
                         request.AffectedSOPInstanceUID)
        return store_status(exc)
    logger.debug("C-STORE %s from %s: %s", result.sop_instance_uid, ae_title,
                 result.outcome.value)
    return SUCCESS


def build_ae(gateway: Gateway) -> AE:
    """The Application Entity: Verification, every storage SOP class pynetdicom knows, and
    Query/Retrieve (Patient Root and Study Root, FIND / MOVE / GET).

    Storage contexts accept whatever SCP/SCU role the requestor proposes (PS3.7 D.3.3.4), so
    that a C-GET SCU can be the Storage SCP of its sub-operations; a requestor that proposes no
    role selection keeps the default roles (it stores, the gateway receives).
    """
    settings = gateway.settings.dimse
    # pynetdicom logs each Query/Retrieve request identifier at INFO, patient names included,
    # and formats it even when INFO is off: neither is wanted (STYLE.md, privacy and latency).
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    ae = AE(ae_title=settings.ae_title)
    ae.require_called_aet = settings.require_called_ae
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.network_timeout = settings.network_timeout
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, STORAGE_TRANSFER_SYNTAXES,
                                     scu_role=True, scp_role=True)
    for sop_class in QUERY_RETRIEVE_FIND + QUERY_RETRIEVE_RETRIEVE:
        ae.add_supported_context(sop_class, QUERY_TRANSFER_SYNTAXES)
    return ae


def handlers(gateway: Gateway, policy: PeerPolicy) -> list[Any]:
    return [
        (evt.EVT_CONN_OPEN, handle_open),
        (evt.EVT_REQUESTED, handle_requested, [policy]),
        (evt.EVT_ACCEPTED, handle_accepted),
        (evt.EVT_C_ECHO, handle_echo, [policy]),
        (evt.EVT_C_STORE, handle_store, [gateway, policy]),
        (evt.EVT_C_FIND, handle_find, [gateway, policy]),
        (evt.EVT_C_MOVE, handle_move, [gateway, policy]),
        (evt.EVT_C_GET, handle_get, [gateway, policy]),
    ]


def tls_context(gateway: Gateway) -> ssl.SSLContext | None:
    """A server TLS context (PS3.15 B.1) when certificate files are configured."""
    settings = gateway.settings.dimse
    if not settings.tls_certificate:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
    if settings.tls_ca_certificates:
        context.load_verify_locations(settings.tls_ca_certificates)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class SharedPortServer(ThreadedAssociationServer):
    """An association server whose port other worker processes may bind too (SO_REUSEPORT)."""

    def server_bind(self) -> None:
        if hasattr(socket, "SO_REUSEPORT") and self.socket is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def start_server(gateway: Gateway, port: int | None = None) -> ThreadedAssociationServer:
    """Start listening (non-blocking); stop with ``server.shutdown()``.

    With ``[dimse] workers`` above 1 the port is bound with SO_REUSEPORT so that worker
    processes (``port`` given: the port the first process bound) share the connections.
    """
    settings = gateway.settings.dimse
    policy = PeerPolicy(settings.peers)
    ae = build_ae(gateway)
    server = ae.make_server(
        (settings.host, settings.port if port is None else port),
        evt_handlers=handlers(gateway, policy),
        ssl_context=tls_context(gateway),
        server_class=SharedPortServer if settings.workers > 1 else ThreadedAssociationServer,
    )
    ae._servers.append(server)  # noqa: SLF001 - as AE.start_server does; shutdown() removes it
    thread = threading.Thread(target=server.serve_forever, name="dimse-acceptor", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    logger.info("DIMSE %s listening on %s:%s", settings.ae_title, host, port)
    if not is_loopback(settings.host) and not policy.store_allow_list:
        logger.warning(
            "DIMSE listens on %s and no [dimse.peers] entry has store = true: any AE that "
            "reaches the port may store instances; list the peers that may store",
            settings.host)
    return server


__all__ = ["STORAGE_TRANSFER_SYNTAXES", "UID", "build_ae", "start_server"]
