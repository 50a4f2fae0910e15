"""The gateway's DIMSE Application Entity and its server: which way each association runs.

Every connection is offered first to :class:`dimse.loop.acceptor.Acceptor`, which runs the
associations it can (plain TCP, no user identity or SOP class extended negotiation) in the
connection's own thread; the others go, unread, to pynetdicom, with the handlers of
:mod:`dimse.toolkit.handlers`. Both ways answer through the same services
(:mod:`dimse.services`) and the same AE: its supported contexts, its association limit, its
``associate`` for the association of a C-MOVE.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
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

from dimse.loop.acceptor import Acceptor
from dimse.loop.storage_scu import StorageRequestor
from dimse.peers import PeerPolicy, is_loopback
from dimse.tls import server_tls_context
from dimse.toolkit.handlers import handlers
from dimse.toolkit.timing import tune_requestor
from gateway.core import Gateway
from gateway.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

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


class GatewayAE(AE):
    """pynetdicom's AE, whose outgoing associations (C-MOVE sub-operations, over TCP or TLS)
    are :class:`dimse.loop.storage_scu.StorageRequestor`, and whose association limit counts the
    associations :class:`dimse.loop.acceptor.Acceptor` runs."""

    # Set by start_server: how many associations dimse.loop.acceptor runs now.
    own_associations: Callable[[], int] | None = None

    @property
    def maximum_associations(self) -> int:
        """What is left to pynetdicom of ``[dimse] max_associations``: its own check
        (``acse``) sees only the associations it runs."""
        own = self.own_associations() if self.own_associations is not None else 0
        return max(self._shared_limit - own, 0)

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        self._shared_limit = int(value)

    def associate(self, addr: Any, port: int, contexts: Any = None, ae_title: str = "ANY-SCP",
                  max_pdu: int = 16382, ext_neg: Any = None, bind_address: Any = None,
                  tls_args: Any = None, evt_handlers: Any = None) -> Any:
        if ext_neg or bind_address is not None or not contexts:
            # pynetdicom's own association: tuned, and polled at the short delay.
            tuned = [(evt.EVT_CONN_OPEN, tune_requestor), *(evt_handlers or ())]
            return super().associate(addr, port, contexts, ae_title, max_pdu, ext_neg,
                                     bind_address, tls_args, tuned)
        requestor = StorageRequestor.open(
            str(addr), port, calling_ae_title=str(self.ae_title),
            called_ae_title=str(ae_title), contexts=list(contexts), max_pdu=max_pdu,
            timeout=float(self.network_timeout or 60.0), tls=tls_args)
        if requestor.is_established:
            # What pynetdicom would signal; the move handler learns the accepted contexts.
            for event, handler, *args in evt_handlers or ():
                if event is evt.EVT_ESTABLISHED:
                    handler(SimpleNamespace(assoc=requestor), *args)
        return requestor


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
    ae = GatewayAE(ae_title=settings.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
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


class AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server; the associations :class:`dimse.loop.acceptor.Acceptor` can run
    are run by it, in the connection's thread."""

    acceptor: Acceptor | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        acceptor = self.acceptor
        if acceptor is not None and acceptor.take(request, client_address):
            return
        super().finish_request(request, client_address)

    def server_close(self) -> None:
        if self.acceptor is not None:
            self.acceptor.close_all()
        super().server_close()

    def shutdown(self) -> None:
        """Stop serving at once, not at the next poll of ``serve_forever`` (every 0.5 s).

        Shutting the listening socket down makes it readable (Linux): the serve loop wakes,
        its ``accept`` fails (ignored by ``socketserver``) until it sees the stop request
        ``super().shutdown()`` makes, a few microseconds later. Connections still waiting in
        the backlog are refused, as closing the socket would. Elsewhere the call fails and
        the poll ends the loop as before.
        """
        if self.socket is not None:
            with contextlib.suppress(OSError):
                self.socket.shutdown(socket.SHUT_RDWR)
        super().shutdown()


class SharedPortServer(AssociationServer):
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
        ssl_context=server_tls_context(settings),
        server_class=SharedPortServer if settings.workers > 1 else AssociationServer,
    )
    if not isinstance(server, AssociationServer):
        raise TypeError(f"unexpected server class {type(server).__name__}")
    server.acceptor = Acceptor(gateway, policy, ae)
    if isinstance(ae, GatewayAE):
        ae.own_associations = server.acceptor.slots.ours
    ae._servers.append(server)  # noqa: SLF001 - as AE.start_server does; shutdown() removes it
    thread = threading.Thread(target=server.serve_forever, name="dimse-acceptor", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    logger.info("DIMSE %s listening on %s:%s", settings.ae_title, host, port)
    for ae_title in policy.unbound_peers():
        peer = policy.peers[ae_title]
        granted = [s for s in ("find", "move", "get") if getattr(peer, s)]
        logger.warning(
            "[dimse.peers] %s names no host: any caller calling itself %s is taken for it%s; "
            "set host (or hosts) to its address(es)", ae_title, ae_title,
            f" (its {'/'.join(granted)} are refused except from loopback)" if granted else "")
    if not is_loopback(settings.host) and not policy.store_allow_list:
        logger.warning(
            "DIMSE listens on %s and no [dimse.peers] entry has store = true: any AE that "
            "reaches the port may store instances; list the peers that may store",
            settings.host)
    return server


__all__ = ["STORAGE_TRANSFER_SYNTAXES", "UID", "build_ae", "start_server"]
