"""C-STORE (PS3.4 Annex B): keep a received data set, and the status to answer with.

One function for both ways an association runs: the gateway's own loop
(:mod:`dimse.loop.acceptor`) and pynetdicom (:mod:`dimse.toolkit.handlers`: TLS, user identity,
SOP class extended negotiation).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from dimse.peers import PeerPolicy
from dimse.status import NOT_AUTHORIZED, SUCCESS, status_class, store_status
from gateway.audit import StoredInstances, record_stored
from gateway.core import Gateway
from gateway.errors import GatewayError
from gateway.metrics import METRICS
from gateway.part10 import file_meta_header

logger = logging.getLogger(__name__)

STORE_LATENCY = "gateway_dimse_store_seconds"


def store_instance(gateway: Gateway, policy: PeerPolicy, ae_title: str, address: str,
                   sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                   data_set: bytes | Sequence[bytes | memoryview],
                   stored: StoredInstances | None = None) -> tuple[int, str]:
    """Store one data set received under a C-STORE request; ``(status, error comment)``.

    Success is returned only once the instance is durable and indexed
    (:meth:`gateway.ingest.Ingestor.ingest`). ``data_set`` is the encoded data set, whole or as
    the fragments it arrived in; it is joined once behind its Part 10 file meta information.
    A stored instance is added to ``stored``, the association's tally, which
    :func:`record_association` writes to the trail when the association ends.
    The time until the status is known goes to :data:`STORE_LATENCY`.
    """
    started = time.perf_counter()
    status, comment = _store(gateway, policy, ae_title, address, sop_class_uid,
                             sop_instance_uid, transfer_syntax, data_set, stored)
    METRICS.observe(STORE_LATENCY, time.perf_counter() - started, status=status_class(status))
    return status, comment


def _store(gateway: Gateway, policy: PeerPolicy, ae_title: str, address: str,
           sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
           data_set: bytes | Sequence[bytes | memoryview],
           stored: StoredInstances | None) -> tuple[int, str]:
    if not policy.allows("store", ae_title, address):
        logger.warning("refused C-STORE from %s at %s: not in the store allow-list",
                       ae_title, address)
        return NOT_AUTHORIZED, "this AE title may not store here"
    header = file_meta_header(sop_class_uid, sop_instance_uid, transfer_syntax, ae_title)
    fragments = [data_set] if isinstance(data_set, bytes) else data_set
    try:
        result = gateway.ingestor.ingest(
            b"".join([header, *fragments]),
            source=f"dimse:{ae_title}@{address}",
            expected_sop_class_uid=sop_class_uid,
            expected_sop_instance_uid=sop_instance_uid,
        )
    except GatewayError as exc:
        status = store_status(exc)
        METRICS.inc("gateway_instances_rejected_total")
        logger.warning("C-STORE from %s at %s of %s refused with 0x%04X: %s", ae_title, address,
                       sop_instance_uid, status, exc)
        return status, str(exc)
    except Exception as exc:  # never let an unexpected error kill the association silently
        logger.exception("C-STORE from %s at %s of %s failed", ae_title, address,
                         sop_instance_uid)
        return store_status(exc), "processing failure"
    logger.debug("C-STORE %s from %s: %s", result.sop_instance_uid, ae_title,
                 result.outcome.value)
    if stored is not None:
        stored.add(result.study_instance_uid, result.sop_instance_uid)
    return SUCCESS, ""


def record_association(gateway: Gateway, stored: StoredInstances, ae_title: str,
                       address: str) -> None:
    """Put what one association stored in the access trail: one "DICOM Instances
    Transferred" entry per study (PS3.15 A.5.3), written once, on release or abort, so the
    C-STORE path itself writes nothing more than the instance's row."""
    record_stored(gateway.audit, stored, principal=f"dimse:{ae_title}", address=address,
                  detail=f"C-STORE: {len(stored)} instances stored in the association")
