"""The associations pynetdicom runs (TLS, user identity, SOP class extended negotiation): its
event handlers, thin adapters over the services both ways share (:mod:`dimse.services`).

pynetdicom runs each association on its own thread and calls these handlers there; they call
the synchronous core directly. Each service handler only translates: the peer and request
from pynetdicom's event, the decision's answer into pynetdicom's return or generator protocol.
A C-STORE success is sent only after :meth:`gateway.ingest.Ingestor.ingest` returned, that is
after the file is durable and its index row committed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pynetdicom import evt
from pynetdicom.presentation import PresentationContext

from dimse.loop.negotiation import contexts_in_requestor_order
from dimse.loop.storage_scu import StorageRequestor
from dimse.peers import PeerPolicy
from dimse.services.find import as_dataset, find_responses
from dimse.services.retrieve import (
    MoveAssociation,
    dataset_for,
    decide_get,
    decide_move,
    destination_request,
)
from dimse.services.store import record_association, store_instance
from dimse.status import CANCEL, NOT_AUTHORIZED, PENDING, SUCCESS, UNABLE_TO_PROCESS
from dimse.toolkit.timing import busy, tune_connection, wait_until_sent
from gateway.audit import StoredInstances
from gateway.core import Gateway
from gateway.instances import InstanceRef
from gateway.metrics import METRICS

logger = logging.getLogger(__name__)

# A-ASSOCIATE-RJ: rejected-permanent, DUL service user, calling AE title not recognised.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)


def peer_of(event: Any) -> tuple[str, str]:
    """The calling AE title and the address of an event's association."""
    requestor = event.assoc.requestor
    return str(requestor.ae_title).strip(), str(requestor.address)


# -- the association -------------------------------------------------------------------------
def handle_open(event: Any) -> None:
    """Tune the new connection's socket before any PDU is read."""
    tune_connection(event.assoc)


def handle_requested(event: Any, policy: PeerPolicy) -> None:
    """Reject an association whose peer may use no service at all; else prefer its syntaxes
    (:func:`dimse.loop.negotiation.contexts_in_requestor_order`)."""
    ae_title, address = peer_of(event)
    if not policy.allows_anything(ae_title, address):
        logger.warning("rejected association from %s at %s: peer not allowed", ae_title, address)
        METRICS.inc("gateway_dimse_associations_rejected_total")
        event.assoc.acse.send_reject(*REJECT_CALLING_AE)
        return
    prefer_requestor_syntaxes(event.assoc)


def prefer_requestor_syntaxes(assoc: Any) -> None:
    assoc.acceptor.supported_contexts = contexts_in_requestor_order(
        assoc.requestor.primitive.presentation_context_definition_list,
        assoc.acceptor.supported_contexts)


def handle_accepted(event: Any) -> None:
    ae_title, address = peer_of(event)
    METRICS.inc("gateway_dimse_associations_total")
    logger.info("association from %s at %s accepted", ae_title, address)


def handle_close(event: Any, gateway: Gateway, tallies: StoreTallies) -> None:
    """The connection ended (released, aborted or dropped): record what it stored."""
    stored = tallies.pop(event.assoc)
    if stored:
        ae_title, address = peer_of(event)
        record_association(gateway, stored, ae_title, address)


# -- C-ECHO, C-STORE -------------------------------------------------------------------------
def handle_echo(event: Any, policy: PeerPolicy) -> int:
    """C-ECHO (PS3.4 Annex A)."""
    ae_title, address = peer_of(event)
    if not policy.allows("echo", ae_title, address):
        return NOT_AUTHORIZED
    return SUCCESS


class StoreTallies:
    """What each association pynetdicom runs has stored, until it ends (then one trail entry:
    :func:`dimse.services.store.record_association`). Keyed by the association object; its
    C-STOREs arrive on its own thread, so only the dictionary needs the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tallies: dict[Any, StoredInstances] = {}

    def of(self, assoc: Any) -> StoredInstances:
        with self._lock:
            tally = self._tallies.get(assoc)
            if tally is None:
                tally = self._tallies[assoc] = StoredInstances()
            return tally

    def pop(self, assoc: Any) -> StoredInstances | None:
        with self._lock:
            return self._tallies.pop(assoc, None)


def handle_store(event: Any, gateway: Gateway, policy: PeerPolicy,
                 tallies: StoreTallies) -> Any:
    """C-STORE (PS3.4 Annex B): :func:`dimse.services.store.store_instance`."""
    ae_title, address = peer_of(event)
    request = event.request
    status, comment = store_instance(
        gateway, policy, ae_title, address, str(request.AffectedSOPClassUID),
        str(request.AffectedSOPInstanceUID), str(event.context.transfer_syntax),
        event.encoded_dataset(include_meta=False), tallies.of(event.assoc))
    if not comment:
        return status
    response = Dataset()
    response.Status = status
    response.ErrorComment = comment[:64]
    return response


# -- C-FIND, C-MOVE, C-GET -------------------------------------------------------------------
def handle_find(event: Any, gateway: Gateway, policy: PeerPolicy) -> Iterator[Any]:
    """C-FIND (PS3.4 C.4.1): :func:`dimse.services.find.find_responses` in pynetdicom's
    generator protocol."""
    ae_title, address = peer_of(event)
    with busy(event.assoc):
        for status, match in find_responses(gateway, policy, ae_title, address,
                                            str(event.request.AffectedSOPClassUID),
                                            lambda: event.identifier,
                                            lambda: bool(event.is_cancelled)):
            if status == SUCCESS:
                return  # pynetdicom sends the final Success itself
            yield status, as_dataset(match) if match is not None else None
            if status == PENDING:
                wait_until_sent(event.assoc)


def handle_move(event: Any, gateway: Gateway, policy: PeerPolicy) -> Iterator[Any]:
    """C-MOVE (PS3.4 C.4.2): :func:`dimse.services.retrieve.decide_move` in pynetdicom's
    generator protocol: the destination, the number of sub-operations, then one ``(status,
    data set)`` per sub-operation, which pynetdicom sends, counts and answers for (Success,
    0xB000 when some failed, 0xA702 when all failed).

    A refused peer or an unknown destination yields no destination: pynetdicom answers 0xA801
    without contacting anyone. pynetdicom opens the association to the destination before any
    other status can be sent, so a failed identifier is answered once it is open.
    """
    ae_title, address = peer_of(event)
    decision = decide_move(gateway, policy, ae_title, address,
                           (event.move_destination or "").strip(),
                           str(event.request.AffectedSOPClassUID), lambda: event.identifier)
    if decision.destination is None:
        yield None, None
        return
    holder = MoveAssociation()
    yield destination_request(decision.destination, gateway.settings.dimse, decision.instances,
                              holder)
    if decision.status is not None:
        yield 1
        yield decision.status, None
        return
    yield len(decision.instances)
    # pynetdicom has now associated with the destination. It names the gateway as the Move
    # Originator of each sub-operation; PS3.7 9.1.1.1 wants the C-MOVE's requestor.
    raw = isinstance(holder.assoc, StorageRequestor)
    if raw:
        holder.assoc.move_originator = ae_title
    with busy(event.assoc):
        yield from _sub_operations(decision.instances, event, holder.accepted_contexts,
                                   f"C-MOVE from {ae_title} at {address}",
                                   locate=gateway.storage.path, raw=raw)


def handle_get(event: Any, gateway: Gateway, policy: PeerPolicy) -> Iterator[Any]:
    """C-GET (PS3.4 C.4.3): :func:`dimse.services.retrieve.decide_get` in pynetdicom's
    generator protocol; the instances go back over the same association.

    The peer proposes a storage context for each SOP class with SCP/SCU Role Selection
    (PS3.7 D.3.3.4) making it the Storage SCP; sub-operations use the contexts it accepted.
    """
    ae_title, address = peer_of(event)
    decision = decide_get(gateway, policy, ae_title, address,
                          str(event.request.AffectedSOPClassUID), lambda: event.identifier)
    if decision.status is not None:
        yield 1
        yield decision.status, None
        return
    yield len(decision.instances)
    with busy(event.assoc):
        yield from _sub_operations(decision.instances, event,
                                   list(event.assoc.accepted_contexts),
                                   f"C-GET from {ae_title} at {address}",
                                   locate=gateway.storage.path)


def _sub_operations(items: list[InstanceRef], event: Any, accepted: list[PresentationContext],
                    what: str, *, locate: Callable[[str], Path], raw: bool = False
                    ) -> Iterator[tuple[int, Dataset | None]]:
    """One Pending per sub-operation (pynetdicom sends it and counts it), or Cancel as soon as
    the peer sent C-CANCEL. An unexpected error (a defect: each instance's own failures are
    counted as failed sub-operations) ends the operation with 0xC000, as the own loop answers
    it (:func:`dimse.loop.retrieve.unless_failed`), rather than pynetdicom's 0xC511 / 0xC411."""
    try:
        for item in items:
            if event.is_cancelled:
                logger.info("%s cancelled by the peer", what)
                yield CANCEL, None
                return
            yield PENDING, dataset_for(item, accepted, locate=locate, raw=raw)
    except Exception:  # noqa: BLE001 - mapped once, here, to "unable to process"
        logger.exception("%s failed during its sub-operations", what)
        yield UNABLE_TO_PROCESS, None


def handlers(gateway: Gateway, policy: PeerPolicy) -> list[Any]:
    """pynetdicom's event handlers, bound as STYLE.md shows: plain functions with their
    dependencies passed in."""
    tallies = StoreTallies()
    return [
        (evt.EVT_CONN_OPEN, handle_open),
        (evt.EVT_REQUESTED, handle_requested, [policy]),
        (evt.EVT_ACCEPTED, handle_accepted),
        (evt.EVT_C_ECHO, handle_echo, [policy]),
        (evt.EVT_C_STORE, handle_store, [gateway, policy, tallies]),
        (evt.EVT_CONN_CLOSE, handle_close, [gateway, tallies]),
        (evt.EVT_C_FIND, handle_find, [gateway, policy]),
        (evt.EVT_C_MOVE, handle_move, [gateway, policy]),
        (evt.EVT_C_GET, handle_get, [gateway, policy]),
    ]
