"""C-MOVE and C-GET on the associations the gateway runs itself: the decision is
:mod:`dimse.services.retrieve`'s; here the sub-operations are sent and counted, as pynetdicom
does for the associations it runs (PS3.4 C.4.2.3, C.4.3.3).

:mod:`dimse.loop.acceptor` sends a C-MOVE-RSP or C-GET-RSP per :class:`Progress`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pynetdicom.presentation import PresentationContext

from dimse.loop.command_set import CommandSetError
from dimse.loop.storage_scu import StorageRequestor
from dimse.loop.upper_layer import PeerClosed, ProtocolError
from dimse.peers import PeerPolicy
from dimse.services.retrieve import (
    MoveAssociation,
    Unsendable,
    dataset_for,
    decide_get,
    decide_move,
    destination_request,
)
from dimse.status import (
    CANCEL,
    MOVE_DESTINATION_UNKNOWN,
    PENDING,
    SUB_OPERATIONS_FAILED,
    SUB_OPERATIONS_WARNING,
    SUCCESS,
    UNABLE_TO_PROCESS,
)
from gateway.core import Gateway
from gateway.instances import InstanceRef

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """One C-MOVE or C-GET response to send (PS3.4 C.4.2.1.4, C.4.3.1.3): status and
    sub-operation counts."""

    status: int
    remaining: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)

    @property
    def counts(self) -> tuple[int, int, int, int]:
        return self.remaining, self.completed, self.failed, self.warning


def move_progress(gateway: Gateway, policy: PeerPolicy, ae_title: str, address: str,
                  destination_ae: str, sop_class_uid: str, message_id: int,
                  decode_identifier: Callable[[], Dataset], is_cancelled: Callable[[], bool],
                  associate: Callable[..., Any]) -> Iterator[Progress]:
    """C-MOVE: :func:`dimse.services.retrieve.decide_move`, then a Pending progress per
    sub-operation and the final one.

    ``associate`` is the AE's (:meth:`dimse.scp.GatewayAE.associate`); a destination that does
    not accept the association is 0xA801. Each C-STORE sub-operation names the C-MOVE's
    requestor (``ae_title``) and ``message_id`` as its Move Originator (PS3.7 9.1.1.1).
    """
    decision = decide_move(gateway, policy, ae_title, address, destination_ae, sop_class_uid,
                           decode_identifier)
    destination = decision.destination
    if decision.status is not None or destination is None:
        yield Progress(MOVE_DESTINATION_UNKNOWN if decision.status is None else decision.status)
        return
    holder = MoveAssociation()
    host, port, kwargs = destination_request(destination, gateway.settings.dimse,
                                             decision.instances, holder)
    store = associate(host, port, ae_title=destination_ae, **kwargs)
    if not store.is_established:
        logger.warning("C-MOVE from %s at %s: cannot associate with %s at %s:%s", ae_title,
                       address, destination_ae, host, port)
        yield Progress(MOVE_DESTINATION_UNKNOWN)
        return
    what = f"C-MOVE from {ae_title} at {address}"
    try:
        yield from unless_failed(sub_operations(
            decision.instances, store, list(store.accepted_contexts),
            isinstance(store, StorageRequestor), is_cancelled, what,
            locate=gateway.storage.path, originator=(ae_title, message_id)), what)
    finally:
        store.release()


def get_progress(gateway: Gateway, policy: PeerPolicy, ae_title: str, address: str,
                 sop_class_uid: str, decode_identifier: Callable[[], Dataset],
                 is_cancelled: Callable[[], bool], store: Any,
                 accepted: list[PresentationContext]) -> Iterator[Progress]:
    """C-GET: :func:`dimse.services.retrieve.decide_get`, then the sub-operations; ``store``
    sends each instance back on the C-GET's own association, over the ``accepted`` contexts in
    which the peer took the Storage SCP role."""
    decision = decide_get(gateway, policy, ae_title, address, sop_class_uid, decode_identifier)
    if decision.status is not None:
        yield Progress(decision.status)
        return
    what = f"C-GET from {ae_title} at {address}"
    yield from unless_failed(sub_operations(decision.instances, store, accepted, True,
                                            is_cancelled, what, locate=gateway.storage.path),
                             what)


def unless_failed(steps: Iterator[Progress], what: str) -> Iterator[Progress]:
    """``steps``; an unexpected error (a defect: each instance's own failures are counted as
    failed sub-operations) ends the operation with 0xC000 and the counts so far, as pynetdicom's
    way answers it (:func:`dimse.toolkit.handlers.handle_move`). A fault of the association
    itself still ends the association (A-ABORT)."""
    last = Progress(UNABLE_TO_PROCESS)
    try:
        for last in steps:
            yield last
    except (ProtocolError, PeerClosed, CommandSetError, OSError):
        raise
    except Exception:  # noqa: BLE001 - mapped once, here, to "unable to process"
        logger.exception("%s failed during its sub-operations", what)
        yield replace(last, status=UNABLE_TO_PROCESS, failed_uids=list(last.failed_uids))


def sub_operations(items: list[InstanceRef], store: Any,
                   accepted: list[PresentationContext], raw: bool,
                   is_cancelled: Callable[[], bool], what: str, *,
                   locate: Callable[[str], Path],
                   originator: tuple[str, int] | None = None) -> Iterator[Progress]:
    """The C-STORE sub-operations of a C-MOVE or C-GET (PS3.4 C.4.2.3, C.4.3.3): a Pending
    progress after each, then the final status (Success; 0xB000 when some failed or warned;
    0xA702 when all failed); Cancel as soon as the peer asked."""
    progress = Progress(PENDING, remaining=len(items))
    for number, item in enumerate(items, start=1):
        if is_cancelled():
            logger.info("%s cancelled by the peer", what)
            progress.status = CANCEL
            yield progress
            return
        progress.remaining -= 1
        dataset = dataset_for(item, accepted, locate=locate, raw=raw)
        status = _sub_operation(store, dataset, number, *(originator or ("", None)))
        if status is None or not (status == SUCCESS or status & 0xF000 == 0xB000):
            progress.failed += 1
            progress.failed_uids.append(item.sop_instance_uid)
        elif status == SUCCESS:
            progress.completed += 1
        else:
            progress.warning += 1
        yield progress
    if progress.failed and progress.failed == len(items):
        progress.status = SUB_OPERATIONS_FAILED
    elif progress.failed or progress.warning:
        progress.status = SUB_OPERATIONS_WARNING
    else:
        progress.status = SUCCESS
    yield progress


def _sub_operation(store: Any, dataset: Dataset, message_id: int, originator: str,
                   originator_message_id: int | None) -> int | None:
    """Send one instance; its C-STORE-RSP status, or ``None`` when it could not be sent."""
    if isinstance(dataset, Unsendable):
        return None
    try:
        response = store.send_c_store(dataset, msg_id=message_id, originator_aet=originator,
                                      originator_id=originator_message_id)
        return int(response.Status)
    except Exception as exc:  # noqa: BLE001 - any failure counts against this sub-operation
        logger.warning("C-STORE sub-operation of %s failed: %s", dataset.SOPInstanceUID, exc)
        return None
