"""A data set that cannot be DICOM (a 20 MB run of zeros, sent by C-STORE to the real server) is
refused 0xC000 before pydicom reads it: pydicom spent about half a CPU-second per MB on it."""

from __future__ import annotations

import time

from pydicom.uid import CTImageStorage

from gateway.models import Instance
from tests.support.common import LiveServer
from tests.support.dimse_helpers import associate, send_raw_store

CANNOT_UNDERSTAND = 0xC000


def test_twenty_megabytes_of_zeros_are_refused_cheaply(live: LiveServer) -> None:
    assoc = associate(live.dimse_port)
    assert assoc.is_established
    try:
        before = time.process_time()
        status = send_raw_store(assoc, CTImageStorage, "1.2.826.0.1.3680043.8.498.88",
                                bytes(20 * 1024 * 1024))
        spent = time.process_time() - before
    finally:
        assoc.release()
    assert status == CANNOT_UNDERSTAND
    # Generous: receiving and spooling 20 MB costs a fraction of this; parsing them, ~10 s.
    assert spent < 3.0, f"{spent:.1f} CPU-seconds to refuse 20 MB of zeros"
    with live.gateway.index.Session() as session:
        assert session.query(Instance).count() == 0
    assert not list((live.gateway.settings.data_dir / "files").rglob("*.dcm"))
