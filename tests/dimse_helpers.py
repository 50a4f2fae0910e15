"""Helpers to speak DIMSE from tests, including malformed data no well-behaved SCU would send."""

from __future__ import annotations

import time
from io import BytesIO
from typing import Any

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]


def associate(port: int, *, calling: str = "TESTSCU", called: str = "DICOMGW",
              contexts: list[str] | None = None) -> Any:
    ae = AE(ae_title=calling)
    for context in contexts or [Verification, CTImageStorage]:
        ae.add_requested_context(context, [ExplicitVRLittleEndian])
    return ae.associate("127.0.0.1", port, ae_title=called)


def send_raw_store(assoc: Any, sop_class: str, sop_instance: str, dataset_bytes: bytes,
                   transfer_syntax: str = ExplicitVRLittleEndian) -> int:
    """Send a C-STORE whose data set is ``dataset_bytes`` exactly; return the status."""
    context = next(cx for cx in assoc.accepted_contexts
                   if cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == transfer_syntax)
    req = C_STORE()
    req.MessageID = 1
    req.Priority = 2
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_instance
    req.DataSet = BytesIO(dataset_bytes)
    assoc._reactor_checkpoint.clear()  # noqa: SLF001 - as send_c_store does
    while not assoc._is_paused:  # noqa: SLF001
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(req, context.context_id)
        _cx, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()  # noqa: SLF001
    assert rsp is not None, "no C-STORE response"
    return int(rsp.Status)


def status_of(result: Dataset) -> int:
    return int(result.Status)
