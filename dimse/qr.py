"""Query/Retrieve SCP: C-MOVE and C-GET (PS3.4 Annex C), with C-FIND in :mod:`dimse.find`.

pynetdicom runs the DIMSE side: these handlers are generators that yield, in the order its
Query/Retrieve service class expects, the move destination, the number of C-STORE
sub-operations, then one ``(status, dataset)`` per instance; pynetdicom sends each data set in a
C-STORE sub-operation, counts completed / failed / warning / remaining sub-operations and sends
the Pending responses and the final one (Success, 0xB000 Warning when some failed, 0xA702 when
all failed, PS3.4 C.4.2.1.5 and C.4.3.1.3.1).

What the gateway decides here:

- which instances (:func:`gateway.retrieve.instances_for`, UID-level, no matching rules);
- who may ask (:class:`dimse.peers.PeerPolicy`);
- where a C-MOVE goes (``[dimse.destinations]``, by AE title; one association per move, with
  the presentation contexts the matched instances need);
- in which transfer syntax each instance travels: as stored when the peer accepted that
  syntax; otherwise decompressed to an uncompressed little endian syntax if the peer accepted
  one for the SOP class (pynetdicom converts between explicit and implicit VR); otherwise the
  sub-operation fails and is counted as failed, its SOP Instance UID listed in the Failed SOP
  Instance UID List of the final response.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.presentation import PresentationContext

from dimse.peers import PeerPolicy, Service
from dimse.storage_scu import StorageRequestor, StoredFile
from dimse.transport import install_fast_recv, tune_socket
from gateway.audit import EVENTS, Action, AuditEvent
from gateway.config import Destination, DimseSettings
from gateway.core import Gateway
from gateway.errors import InvalidQuery
from gateway.instances import InstanceRef
from gateway.retrieve import instances_for

logger = logging.getLogger(__name__)
trail_logger = logging.getLogger("dimse.audit")

# PS3.4 C.4.2.1.5 (C-MOVE) and C.4.3.1.3.1 (C-GET) response statuses.
PENDING = 0xFF00  # Pending: sub-operations are continuing
SUB_OPERATIONS_FAILED = 0xA702  # Refused: Out of resources, unable to perform sub-operations
SUB_OPERATIONS_WARNING = 0xB000  # Warning: sub-operations complete, one or more failures
CANCEL = 0xFE00  # Cancel: sub-operations terminated due to Cancel indication
MOVE_DESTINATION_UNKNOWN = 0xA801  # Refused: Move Destination unknown
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: Identifier does not match SOP Class
UNABLE_TO_PROCESS = 0xC000  # Failed: Unable to process
# PS3.7 Annex C, general status: the DIMSE-service-user is not authorised for the operation.
NOT_AUTHORIZED = 0x0124  # Refused: Not Authorized
VERIFICATION = "1.2.840.10008.1.1"
POLL_SECONDS = 0.0002
# A presentation context list holds at most 128 items (PS3.8 9.3.2.2: odd IDs 1..255).
MAX_CONTEXTS = 128
UNCOMPRESSED_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


# PS3.15 A.5.3 events of the access trail.
QUERY_EVENT = Action.QUERY  # 110112 Query (C-FIND)
INSTANCES_ACCESSED = Action.RETRIEVE  # 110103 DICOM Instances Accessed (C-GET)
INSTANCES_TRANSFERRED = Action.TRANSFER  # 110104 DICOM Instances Transferred (C-MOVE)
TRAIL_STUDIES = 20  # study UIDs named per log line; more are counted


def record_access(gateway: Gateway, action: Action, ae_title: str, address: str,
                  study_uids: Iterable[str], detail: str, *, success: bool = True) -> None:
    """Record one query or retrieval in the access trail (DESIGN.md, PS3.15 A.5).

    The entry names the calling AE (``dimse:<AE title>``), its address, the studies and the
    outcome, never patient names; it is committed before the first response is sent. A line is
    logged at INFO too, with UIDs only.
    """
    studies = tuple(dict.fromkeys(study_uids))
    shown = ",".join(studies[:TRAIL_STUDIES])
    if len(studies) > TRAIL_STUDIES:
        shown += f",+{len(studies) - TRAIL_STUDIES}"
    trail_logger.info("audit %s %s by dimse:%s from %s studies=[%s] %s", EVENTS[action].code,
                      "success" if success else "failure", ae_title, address, shown, detail)
    event = AuditEvent(action=action, principal=f"dimse:{ae_title}", address=address,
                       study_uids=studies, detail=detail, success=success)
    try:
        gateway.audit.record(event)
    except Exception:  # noqa: BLE001 - a sink must not fail the access it records
        logger.exception("audit sink failed for %s", action.name)


def peer_of(event: Any) -> tuple[str, str]:
    """The calling AE title and the address of an event's association."""
    requestor = event.assoc.requestor
    return str(requestor.ae_title).strip(), str(requestor.address)


# -- the retrieve identifier -----------------------------------------------------------------
def _values(identifier: Dataset, keyword: str) -> list[str]:
    """The values of a unique key: one UID, or a list of UIDs (PS3.4 C.2.2.2.2)."""
    if keyword not in identifier:
        return []
    value = identifier[keyword].value
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split("\\") if v.strip()]
    return [str(v).strip() for v in value if str(v).strip()]


def requested_instances(gateway: Gateway, identifier: Dataset,
                        information_model: str) -> list[InstanceRef]:
    """The instances a C-MOVE or C-GET identifier names (PS3.4 C.4.2.2.1, C.4.3.2.1).

    Raises
    ------
    InvalidQuery
        When the identifier's level or keys are not valid for the information model.
    """
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if information_model == "STUDY_ROOT" and level == "PATIENT":
        raise InvalidQuery("the Study Root information model has no PATIENT level")
    patient_ids = _values(identifier, "PatientID")
    if len(patient_ids) > 1:
        raise InvalidQuery("PatientID takes one value in a retrieve identifier")
    return instances_for(
        gateway.index,
        level,
        patient_id=patient_ids[0] if patient_ids else None,
        study_instance_uids=_values(identifier, "StudyInstanceUID"),
        series_instance_uids=_values(identifier, "SeriesInstanceUID"),
        sop_instance_uids=_values(identifier, "SOPInstanceUID"),
    )


def information_model(sop_class_uid: str) -> str:
    """``PATIENT_ROOT`` or ``STUDY_ROOT`` for a Query/Retrieve SOP Class UID (PS3.4 C.6)."""
    return "PATIENT_ROOT" if sop_class_uid.startswith("1.2.840.10008.5.1.4.1.2.1.") \
        else "STUDY_ROOT"


def describe(identifier: Dataset) -> str:
    """Level and UIDs of an identifier for the log (never patient names or IDs)."""
    parts = [str(identifier.get("QueryRetrieveLevel", "?"))]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        values = _values(identifier, keyword)
        if values:
            shown = ",".join(values[:3]) + (f",+{len(values) - 3}" if len(values) > 3 else "")
            parts.append(f"{keyword}={shown}")
    return " ".join(parts)


# -- transfer syntax negotiation -------------------------------------------------------------
def retrieve_contexts(instances: list[InstanceRef]) -> list[PresentationContext]:
    """The presentation contexts a move association proposes for these instances.

    Per SOP class: one context with the uncompressed little endian syntaxes, and one per other
    stored transfer syntax proposing it alone, so that the destination can accept both the
    stored encoding and the fallback (PS3.8 9.3.2.2: each context yields one syntax).
    """
    wanted: dict[tuple[str, tuple[str, ...]], None] = {}
    fallbacks: dict[tuple[str, tuple[str, ...]], None] = {}
    for item in instances:
        fallbacks[(item.sop_class_uid, UNCOMPRESSED_LITTLE_ENDIAN)] = None
        if item.transfer_syntax_uid not in UNCOMPRESSED_LITTLE_ENDIAN:
            wanted[(item.sop_class_uid, (item.transfer_syntax_uid,))] = None
    ordered = list(fallbacks) + [key for key in wanted if key not in fallbacks]
    if len(ordered) > MAX_CONTEXTS:
        logger.warning("move needs %d presentation contexts, proposing the first %d",
                       len(ordered), MAX_CONTEXTS)
    return [build_context(sop_class, list(syntaxes))
            for sop_class, syntaxes in ordered[:MAX_CONTEXTS]]


class Unsendable(Dataset):
    """A sub-operation that fails without a C-STORE being attempted."""


def failed_placeholder(item: InstanceRef) -> Dataset:
    """A data set pynetdicom cannot send, so that it counts the sub-operation as failed.

    It carries the SOP Instance UID, which pynetdicom lists in the final response's Failed SOP
    Instance UID List (PS3.4 C.4.2.1.4.2); it has no file meta, so no C-STORE is attempted.
    """
    ds = Unsendable()
    ds.SOPClassUID = item.sop_class_uid
    ds.SOPInstanceUID = item.sop_instance_uid
    return ds


def dataset_for(item: InstanceRef, accepted: list[PresentationContext], *,
                locate: Callable[[str], Path], raw: bool = False) -> Dataset:
    """The data set to send for ``item`` over an association with these accepted contexts.

    As stored when its transfer syntax was accepted for its SOP class (with ``raw``, for a
    :class:`~dimse.storage_scu.StorageRequestor`, the file's bytes are sent without decoding);
    decompressed (pixel data decoded with pydicom's plugins, same SOP Instance UID) when only an
    uncompressed little endian syntax was; otherwise a :func:`failed_placeholder`.
    """
    syntaxes = {str(cx.transfer_syntax[0]) for cx in accepted
                if cx.abstract_syntax == item.sop_class_uid and cx.as_scu}
    if not syntaxes:
        logger.warning("peer accepted no context for SOP class %s: %s not sent",
                       item.sop_class_uid, item.sop_instance_uid)
        return failed_placeholder(item)
    path = locate(item.file_path)
    if raw and item.transfer_syntax_uid in syntaxes:
        return StoredFile(item.sop_class_uid, item.sop_instance_uid, item.transfer_syntax_uid,
                          path)
    try:
        ds = dcmread(path)
    except (OSError, ValueError) as exc:
        logger.error("cannot read stored %s (%s): %s", item.sop_instance_uid, path.name, exc)
        return failed_placeholder(item)
    stored = UID(str(ds.file_meta.TransferSyntaxUID))
    if stored in syntaxes:
        return ds
    uncompressed = syntaxes.intersection(UNCOMPRESSED_LITTLE_ENDIAN)
    if stored.is_little_endian and not stored.is_compressed and uncompressed:
        return ds  # pynetdicom converts between explicit/implicit VR and (in)deflated
    if stored.is_compressed and uncompressed:
        try:
            # A change of transfer syntax keeps the SOP Instance (PS3.5 §10, PS3.4 C.4.2.3).
            ds.decompress(generate_instance_uid=False)
        except Exception as exc:  # noqa: BLE001 - any decoder failure fails this sub-operation
            logger.warning("cannot decompress %s from %s: %s", item.sop_instance_uid,
                           stored.name, exc)
            return failed_placeholder(item)
        return ds
    logger.warning("peer accepted %s for %s but %s is stored as %s: not sent",
                   ",".join(sorted(syntaxes)), item.sop_class_uid, item.sop_instance_uid,
                   stored.name)
    return failed_placeholder(item)


# -- destinations ----------------------------------------------------------------------------
def client_tls_context(settings: DimseSettings) -> ssl.SSLContext:
    """The TLS client context of a move association (PS3.15 B.1).

    The peer's certificate is checked against ``tls_ca_certificates`` (or the system's store);
    the gateway presents its own certificate when one is configured.
    """
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH,
        cafile=str(settings.tls_ca_certificates) if settings.tls_ca_certificates else None,
    )
    if settings.tls_certificate:
        context.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
    return context


def _tune_requestor(event: Any) -> None:
    association_socket = event.assoc.dul.socket
    if association_socket is not None and association_socket.socket is not None:
        tune_socket(association_socket.socket)
        install_fast_recv(association_socket)
    shorten_poll(event.assoc)


def shorten_poll(assoc: Any) -> None:
    """Poll the connection every 0.2 ms instead of pynetdicom's 1 ms.

    pynetdicom's DUL thread sleeps ``_run_loop_delay`` whenever it found nothing to do: each
    P-DATA PDU of a C-STORE sub-operation, each Pending response of a C-FIND, then waits up to
    that long. An idle association polling at 0.2 ms costs ~13% of a core (pynetdicom's 1 ms,
    ~5%), so the short delay is used only while an operation runs (:func:`busy`) and on the
    short-lived association of a move.
    """
    if hasattr(assoc.dul, "_run_loop_delay"):
        assoc.dul._run_loop_delay = POLL_SECONDS


@contextmanager
def busy(assoc: Any) -> Iterator[None]:
    """Shorten the association's poll delay for the duration of one operation."""
    dul = assoc.dul
    previous = getattr(dul, "_run_loop_delay", None)
    shorten_poll(assoc)
    try:
        yield
    finally:
        if previous is not None:
            dul._run_loop_delay = previous


def wait_until_sent(assoc: Any, timeout: float = 30.0) -> None:
    """Let the DUL send what is queued before the next Pending response is queued.

    pynetdicom's DUL thread reads the socket only in a loop turn with nothing to send, and
    the handler's generator can queue every response of a large result at once: a C-CANCEL
    (PS3.7 9.3.2.3) would then be read only after the last match was sent. Waiting for the
    queue to drain gives the DUL turns to read, so a cancel takes effect within a response or
    two, and a large result is not held in memory as queued PDUs.
    """
    outgoing = assoc.dul.to_provider_queue
    deadline = time.monotonic() + timeout
    while not outgoing.empty() and assoc.is_established and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)


@dataclass
class MoveAssociation:
    """Holds the sub-association pynetdicom opens to the move destination, once established."""

    assoc: Any = None
    handlers: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.handlers = [(evt.EVT_CONN_OPEN, _tune_requestor),
                         (evt.EVT_ESTABLISHED, self._established)]

    def _established(self, event: Any) -> None:
        self.assoc = event.assoc

    @property
    def accepted_contexts(self) -> list[PresentationContext]:
        return list(self.assoc.accepted_contexts) if self.assoc is not None else []


def destination_request(destination: Destination, settings: DimseSettings,
                        instances: list[InstanceRef],
                        holder: MoveAssociation) -> tuple[str, int, dict[str, Any]]:
    """What pynetdicom's C-MOVE SCP needs to open the one association of a move."""
    # Verification is always proposed, so that a destination accepting none of the storage
    # contexts still associates and each sub-operation is counted as failed (0xA702 / 0xB000)
    # rather than the whole move being reported as an unreachable destination.
    kwargs: dict[str, Any] = {
        "contexts": retrieve_contexts(instances)[:MAX_CONTEXTS - 1]
        + [build_context(VERIFICATION)],
        "evt_handlers": holder.handlers,
        "max_pdu": settings.max_pdu_size,
    }
    if destination.tls:
        kwargs["tls_args"] = (client_tls_context(settings), destination.host)
    return destination.host, destination.port, kwargs


def _refuse(service: Service, gateway: Gateway, policy: PeerPolicy, event: Any) -> bool:
    ae_title, address = peer_of(event)
    return _refused(service, gateway, policy, ae_title, address)


def _refused(service: Service, gateway: Gateway, policy: PeerPolicy, ae_title: str,
             address: str) -> bool:
    if policy.allows(service, ae_title, address):
        return False
    logger.warning("refused C-%s from %s at %s: not allowed by [dimse.peers]",
                   service.upper(), ae_title, address)
    record_access(gateway, INSTANCES_TRANSFERRED if service == "move" else INSTANCES_ACCESSED,
                  ae_title, address, (), f"C-{service.upper()} refused: peer not allowed",
                  success=False)
    return True


def _pending(items: list[InstanceRef], event: Any, accepted: list[PresentationContext],
             what: str, *, locate: Callable[[str], Path],
             raw: bool = False) -> Iterator[tuple[int, Dataset | None]]:
    """One Pending per sub-operation, or Cancel as soon as the peer sent C-CANCEL."""
    for item in items:
        if event.is_cancelled:
            ae_title, address = peer_of(event)
            logger.info("%s from %s at %s cancelled by the peer", what, ae_title, address)
            yield CANCEL, None
            return
        yield PENDING, dataset_for(item, accepted, locate=locate, raw=raw)


# -- handlers --------------------------------------------------------------------------------
def handle_move(event: Any, gateway: Gateway, policy: PeerPolicy) -> Iterator[Any]:
    """C-MOVE SCP (PS3.4 C.4.2): send the named instances to a configured destination.

    A peer that may not move (``[dimse.peers]``) gets 0xA801 rather than 0x0124: pynetdicom
    opens the association to the move destination before any status can be returned, so the
    only refusal that never contacts a destination on behalf of an unauthorised peer is
    "Move Destination unknown" — which is true for that peer, since it has none.
    """
    ae_title, address = peer_of(event)
    destination_ae = (event.move_destination or "").strip()
    if _refuse("move", gateway, policy, event):
        yield None, None
        return
    destination = gateway.settings.dimse.destinations.get(destination_ae)
    if destination is None:
        logger.warning("C-MOVE from %s at %s to unknown destination %r", ae_title, address,
                       destination_ae)
        yield None, None
        return
    try:
        identifier = event.identifier
        model = information_model(str(event.request.AffectedSOPClassUID))
        items = requested_instances(gateway, identifier, model)
        error: str | None = None
    except InvalidQuery as exc:
        error, items = str(exc), []
    except Exception as exc:  # noqa: BLE001 - a malformed identifier cannot be decoded
        error, items = f"identifier cannot be decoded: {exc}", []
    holder = MoveAssociation()
    if error is not None:
        # pynetdicom needs a destination and a count before a failure can be sent.
        logger.warning("C-MOVE from %s at %s refused: %s", ae_title, address, error)
        yield destination_request(destination, gateway.settings.dimse, [], holder)
        yield 1
        yield IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, None
        return
    record_access(gateway, INSTANCES_TRANSFERRED, ae_title, address,
                  (i.study_instance_uid for i in items),
                  f"C-MOVE to {destination_ae}: {describe(identifier)}, {len(items)} instances")
    yield destination_request(destination, gateway.settings.dimse, items, holder)
    yield len(items)
    # pynetdicom has now associated with the destination. It names the gateway as the Move
    # Originator of each sub-operation; PS3.7 9.1.1.1 wants the C-MOVE's requestor.
    if isinstance(holder.assoc, StorageRequestor):
        holder.assoc.move_originator = ae_title
    with busy(event.assoc):
        yield from _pending(items, event, holder.accepted_contexts, "C-MOVE",
                            locate=gateway.storage.path,
                            raw=isinstance(holder.assoc, StorageRequestor))


@dataclass
class MoveProgress:
    """One C-MOVE response to send (PS3.4 C.4.2.1.4): status and sub-operation counts."""

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
                  associate: Callable[..., Any]) -> Iterator[MoveProgress]:
    """C-MOVE SCP (PS3.4 C.4.2) for :mod:`dimse.acceptor`: a Pending progress per
    sub-operation, then the final one.

    Each C-STORE sub-operation names the C-MOVE's requestor (``ae_title``) and ``message_id``
    as its Move Originator (PS3.7 9.1.1.1), so the destination can tell whose move it serves.

    The same decisions as :func:`handle_move` (refusals, destinations, trail, transfer
    syntaxes); ``associate`` is the AE's (:meth:`dimse.scp.GatewayAE.associate`), which opens a
    :class:`~dimse.storage_scu.StorageRequestor` unless the destination needs TLS.
    """
    destination = gateway.settings.dimse.destinations.get(destination_ae)
    if _refused("move", gateway, policy, ae_title, address):
        yield MoveProgress(MOVE_DESTINATION_UNKNOWN)
        return
    if destination is None:
        logger.warning("C-MOVE from %s at %s to unknown destination %r", ae_title, address,
                       destination_ae)
        yield MoveProgress(MOVE_DESTINATION_UNKNOWN)
        return
    requested = _requested(gateway, decode_identifier, sop_class_uid,
                           f"C-MOVE from {ae_title} at {address}")
    if requested is None:
        yield MoveProgress(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS)
        return
    identifier, items = requested
    record_access(gateway, INSTANCES_TRANSFERRED, ae_title, address,
                  (i.study_instance_uid for i in items),
                  f"C-MOVE to {destination_ae}: {describe(identifier)}, {len(items)} instances")
    holder = MoveAssociation()
    host, port, kwargs = destination_request(destination, gateway.settings.dimse, items, holder)
    store = associate(host, port, ae_title=destination_ae, **kwargs)
    if not store.is_established:
        logger.warning("C-MOVE from %s at %s: cannot associate with %s at %s:%s", ae_title,
                       address, destination_ae, host, port)
        yield MoveProgress(MOVE_DESTINATION_UNKNOWN)
        return
    try:
        yield from sub_operations(items, store, list(store.accepted_contexts),
                                  isinstance(store, StorageRequestor), is_cancelled,
                                  f"C-MOVE from {ae_title} at {address}",
                                  locate=gateway.storage.path,
                                  originator=(ae_title, message_id))
    finally:
        store.release()


def _requested(gateway: Gateway, decode_identifier: Callable[[], Dataset], sop_class_uid: str,
               what: str) -> tuple[Dataset, list[InstanceRef]] | None:
    """The identifier of a C-MOVE or C-GET and the instances it names; ``None`` (logged) when
    it is invalid for the information model or cannot be decoded (0xA900)."""
    try:
        identifier = decode_identifier()
        return identifier, requested_instances(gateway, identifier,
                                               information_model(sop_class_uid))
    except Exception as exc:  # noqa: BLE001 - InvalidQuery, or an undecodable identifier
        logger.warning("%s refused: %s", what, exc)
        return None


def sub_operations(items: list[InstanceRef], store: Any,
                   accepted: list[PresentationContext], raw: bool,
                   is_cancelled: Callable[[], bool], what: str, *,
                   locate: Callable[[str], Path],
                   originator: tuple[str, int] | None = None) -> Iterator[MoveProgress]:
    """The C-STORE sub-operations of a C-MOVE or C-GET (PS3.4 C.4.2.3, C.4.3.3): a Pending
    progress after each, then the final status; Cancel as soon as the peer asked."""
    progress = MoveProgress(PENDING, remaining=len(items))
    for number, item in enumerate(items, start=1):
        if is_cancelled():
            logger.info("%s cancelled by the peer", what)
            progress.status = CANCEL
            yield progress
            return
        progress.remaining -= 1
        dataset = dataset_for(item, accepted, locate=locate, raw=raw)
        status = _sub_operation(store, dataset, number, *(originator or ("", None)))
        if status is None or not (status == 0x0000 or status & 0xF000 == 0xB000):
            progress.failed += 1
            progress.failed_uids.append(item.sop_instance_uid)
        elif status == 0x0000:
            progress.completed += 1
        else:
            progress.warning += 1
        yield progress
    if progress.failed and progress.failed == len(items):
        progress.status = SUB_OPERATIONS_FAILED
    elif progress.failed or progress.warning:
        progress.status = SUB_OPERATIONS_WARNING
    else:
        progress.status = 0x0000
    yield progress


def get_progress(gateway: Gateway, policy: PeerPolicy, ae_title: str, address: str,
                 sop_class_uid: str, decode_identifier: Callable[[], Dataset],
                 is_cancelled: Callable[[], bool], store: Any,
                 accepted: list[PresentationContext]) -> Iterator[MoveProgress]:
    """C-GET SCP (PS3.4 C.4.3) for :mod:`dimse.acceptor`: the same decisions as
    :func:`handle_get`; ``store`` sends each instance back on the C-GET's own association,
    over the ``accepted`` contexts in which the peer took the Storage SCP role."""
    if _refused("get", gateway, policy, ae_title, address):
        yield MoveProgress(NOT_AUTHORIZED)
        return
    requested = _requested(gateway, decode_identifier, sop_class_uid,
                           f"C-GET from {ae_title} at {address}")
    if requested is None:
        yield MoveProgress(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS)
        return
    identifier, items = requested
    record_access(gateway, INSTANCES_ACCESSED, ae_title, address,
                  (i.study_instance_uid for i in items),
                  f"C-GET: {describe(identifier)}, {len(items)} instances")
    yield from sub_operations(items, store, accepted, True, is_cancelled,
                              f"C-GET from {ae_title} at {address}",
                              locate=gateway.storage.path)


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


def handle_get(event: Any, gateway: Gateway, policy: PeerPolicy) -> Iterator[Any]:
    """C-GET SCP (PS3.4 C.4.3): send the named instances back over the same association.

    The peer proposes a storage context for each SOP class with SCP/SCU Role Selection
    (PS3.7 D.3.3.4) making it the Storage SCP; sub-operations use the contexts it accepted.
    """
    ae_title, address = peer_of(event)
    if _refuse("get", gateway, policy, event):
        yield 1
        yield NOT_AUTHORIZED, None
        return
    try:
        identifier = event.identifier
        model = information_model(str(event.request.AffectedSOPClassUID))
        items = requested_instances(gateway, identifier, model)
    except InvalidQuery as exc:
        logger.warning("C-GET from %s at %s refused: %s", ae_title, address, exc)
        yield 1
        yield IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, None
        return
    except Exception as exc:  # noqa: BLE001 - a malformed identifier cannot be decoded
        logger.warning("C-GET from %s at %s: identifier cannot be decoded: %s", ae_title,
                       address, exc)
        yield 1
        yield IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, None
        return
    record_access(gateway, INSTANCES_ACCESSED, ae_title, address,
                  (i.study_instance_uid for i in items),
                  f"C-GET: {describe(identifier)}, {len(items)} instances")
    yield len(items)
    with busy(event.assoc):
        yield from _pending(items, event, list(event.assoc.accepted_contexts), "C-GET",
                            locate=gateway.storage.path)


__all__ = ["busy", "handle_get", "handle_move", "requested_instances", "retrieve_contexts"]
