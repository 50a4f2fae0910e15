"""C-MOVE and C-GET SCP (PS3.4 C.4.2, C.4.3): one decision per service, for both ways an
association runs.

:func:`decide_move` and :func:`decide_get` decide, once, what a request gets:

1. who may ask (:class:`dimse.peers.PeerPolicy`): a C-MOVE by a peer that may not move is
   answered "Move Destination unknown" (0xA801; docs/conformance-dimse.md §5 says why), a
   C-GET "Not Authorized" (0x0124); the refusal is in the trail;
2. where a C-MOVE goes (``[dimse.destinations]``, by AE title): else 0xA801;
3. which instances the identifier names (:func:`gateway.retrieve.instances_for`, unique keys
   only): an identifier that does not fit the information model is 0xA900, one that cannot be
   decoded (or any other error while reading it) 0xC000 (:func:`dimse.status.identifier_status`,
   as C-FIND answers);
4. the trail entry (PS3.15 A.5.3), written before the first response.

The sub-operations then run where the association runs: :mod:`dimse.loop.retrieve` sends them
and counts them itself; pynetdicom does both for :mod:`dimse.toolkit.handlers`. Both take from
here what goes in them:

- in which transfer syntax each instance travels (:func:`dataset_for`): as stored when the peer
  accepted that syntax; otherwise decompressed to an uncompressed little endian syntax if the
  peer accepted one for the SOP class; otherwise the sub-operation fails, its SOP Instance UID
  listed in the Failed SOP Instance UID List of the final response;
- the one association of a move (:func:`destination_request`): the presentation contexts the
  matched instances need, TLS when the destination asks for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.presentation import PresentationContext

from dimse.peers import PeerPolicy
from dimse.services.find import information_model
from dimse.services.trail import INSTANCES_ACCESSED, INSTANCES_TRANSFERRED, record_access
from dimse.status import MOVE_DESTINATION_UNKNOWN, NOT_AUTHORIZED, identifier_status
from dimse.tls import client_tls_context
from gateway.config import Destination, DimseSettings
from gateway.core import Gateway
from gateway.errors import InvalidQuery
from gateway.instances import InstanceRef
from gateway.retrieve import instances_for

logger = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
# A presentation context list holds at most 128 items (PS3.8 9.3.2.2: odd IDs 1..255).
MAX_CONTEXTS = 128
UNCOMPRESSED_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


# -- the decision ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Retrieval:
    """What the gateway decided for one C-MOVE or C-GET request.

    ``status`` is ``None`` when the sub-operations go ahead over ``instances``; otherwise it is
    the one, final, response. ``destination`` is where a C-MOVE goes: set whenever the peer may
    move there, even when the identifier then fails (pynetdicom must be given a destination
    before it can answer anything but 0xA801).
    """

    status: int | None
    instances: list[InstanceRef] = field(default_factory=list)
    destination: Destination | None = None


def decide_move(gateway: Gateway, policy: PeerPolicy, ae_title: str, address: str,
                destination_ae: str, sop_class_uid: str,
                decode_identifier: Callable[[], Dataset]) -> Retrieval:
    """C-MOVE (PS3.4 C.4.2): refusal, destination, identifier and trail, decided once.

    ``decode_identifier`` gives the request's identifier; it is called once, after the peer
    and destination checks.
    """
    if _refused("move", gateway, policy, ae_title, address):
        return Retrieval(MOVE_DESTINATION_UNKNOWN)
    destination = gateway.settings.dimse.destinations.get(destination_ae)
    if destination is None:
        logger.warning("C-MOVE from %s at %s to unknown destination %r", ae_title, address,
                       destination_ae)
        return Retrieval(MOVE_DESTINATION_UNKNOWN)
    what = f"C-MOVE from {ae_title} at {address}"
    read = _requested(gateway, decode_identifier, sop_class_uid, what)
    if isinstance(read, int):
        return Retrieval(read, destination=destination)
    identifier, items = read
    record_access(gateway, INSTANCES_TRANSFERRED, ae_title, address,
                  (i.study_instance_uid for i in items),
                  f"C-MOVE to {destination_ae}: {describe(identifier)}, {len(items)} instances")
    return Retrieval(None, items, destination)


def decide_get(gateway: Gateway, policy: PeerPolicy, ae_title: str, address: str,
               sop_class_uid: str, decode_identifier: Callable[[], Dataset]) -> Retrieval:
    """C-GET (PS3.4 C.4.3): refusal, identifier and trail, decided once; the instances go
    back over the C-GET's own association."""
    if _refused("get", gateway, policy, ae_title, address):
        return Retrieval(NOT_AUTHORIZED)
    read = _requested(gateway, decode_identifier, sop_class_uid,
                      f"C-GET from {ae_title} at {address}")
    if isinstance(read, int):
        return Retrieval(read)
    identifier, items = read
    record_access(gateway, INSTANCES_ACCESSED, ae_title, address,
                  (i.study_instance_uid for i in items),
                  f"C-GET: {describe(identifier)}, {len(items)} instances")
    return Retrieval(None, items)


def _refused(service: Literal["move", "get"], gateway: Gateway, policy: PeerPolicy,
             ae_title: str, address: str) -> bool:
    if policy.allows(service, ae_title, address):
        return False
    logger.warning("refused C-%s from %s at %s: not allowed by [dimse.peers]",
                   service.upper(), ae_title, address)
    record_access(gateway, INSTANCES_TRANSFERRED if service == "move" else INSTANCES_ACCESSED,
                  ae_title, address, (), f"C-{service.upper()} refused: peer not allowed",
                  success=False)
    return True


def _requested(gateway: Gateway, decode_identifier: Callable[[], Dataset], sop_class_uid: str,
               what: str) -> tuple[Dataset, list[InstanceRef]] | int:
    """The identifier of a C-MOVE or C-GET and the instances it names, or the failure status
    (logged) when it cannot be used (:func:`dimse.status.identifier_status`)."""
    try:
        identifier = decode_identifier()
        return identifier, requested_instances(gateway, identifier,
                                               information_model(sop_class_uid))
    except InvalidQuery as exc:
        logger.warning("%s refused: %s", what, exc)
        return identifier_status(exc)
    except Exception as exc:  # noqa: BLE001 - mapped once, here, to "unable to process"
        logger.exception("%s failed: the identifier cannot be read", what)
        return identifier_status(exc)


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


def describe(identifier: Dataset) -> str:
    """Level and UIDs of an identifier for the log (never patient names or IDs)."""
    parts = [str(identifier.get("QueryRetrieveLevel", "?"))]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        values = _values(identifier, keyword)
        if values:
            shown = ",".join(values[:3]) + (f",+{len(values) - 3}" if len(values) > 3 else "")
            parts.append(f"{keyword}={shown}")
    return " ".join(parts)


# -- what each sub-operation sends -----------------------------------------------------------
class StoredFile(Dataset):
    """A stored instance to send as it is on disk: only its UIDs are decoded.

    pynetdicom's C-MOVE SCP hands each yielded data set to ``send_c_store`` and lists the SOP
    Instance UID of a failed one; :class:`~dimse.loop.storage_scu.StorageRequestor` reads the
    file's data set bytes.
    """

    def __init__(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                 path: Path) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        object.__setattr__(self, "stored_transfer_syntax", transfer_syntax_uid)
        object.__setattr__(self, "stored_path", path)


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
    :class:`~dimse.loop.storage_scu.StorageRequestor`, the file's bytes are sent without
    decoding); decompressed (pixel data decoded with pydicom's plugins, same SOP Instance UID)
    when only an uncompressed little endian syntax was; otherwise a :func:`failed_placeholder`.
    ``locate`` gives the local path of a stored file (``gateway.storage.path``); a stored file
    that cannot be located or read fails its sub-operation alone.
    """
    syntaxes = {str(cx.transfer_syntax[0]) for cx in accepted
                if cx.abstract_syntax == item.sop_class_uid and cx.as_scu}
    if not syntaxes:
        logger.warning("peer accepted no context for SOP class %s: %s not sent",
                       item.sop_class_uid, item.sop_instance_uid)
        return failed_placeholder(item)
    try:
        path = locate(item.file_path)
    except Exception:  # noqa: BLE001 - the store failing fails this sub-operation only
        logger.exception("cannot locate stored %s", item.sop_instance_uid)
        return failed_placeholder(item)
    if raw and item.transfer_syntax_uid in syntaxes:
        return StoredFile(item.sop_class_uid, item.sop_instance_uid, item.transfer_syntax_uid,
                          path)
    try:
        ds = dcmread(path)
        stored = UID(str(ds.file_meta.TransferSyntaxUID))
    except Exception as exc:  # noqa: BLE001 - a damaged file fails this sub-operation only
        logger.error("cannot read stored %s (%s): %s", item.sop_instance_uid, path.name, exc)
        return failed_placeholder(item)
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


# -- the association of a move ---------------------------------------------------------------
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


@dataclass
class MoveAssociation:
    """Holds the association opened to the move destination, once established.

    pynetdicom's C-MOVE SCP opens it itself (with the AE's ``associate``) and does not hand it
    to the handler: the ``EVT_ESTABLISHED`` handler passed along with it does.
    """

    assoc: Any = None
    handlers: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.handlers = [(evt.EVT_ESTABLISHED, self._established)]

    def _established(self, event: Any) -> None:
        self.assoc = event.assoc

    @property
    def accepted_contexts(self) -> list[PresentationContext]:
        return list(self.assoc.accepted_contexts) if self.assoc is not None else []


def destination_request(destination: Destination, settings: DimseSettings,
                        instances: list[InstanceRef],
                        holder: MoveAssociation) -> tuple[str, int, dict[str, Any]]:
    """``(host, port, keyword arguments)`` of the AE's ``associate`` for the one association
    of a move (:meth:`dimse.scp.GatewayAE.associate`), as pynetdicom's C-MOVE SCP takes it."""
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


__all__ = ["Retrieval", "dataset_for", "decide_get", "decide_move", "destination_request",
           "requested_instances", "retrieve_contexts"]
