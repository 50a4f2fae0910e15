"""Deflate bombs (Deflated Explicit VR Little Endian, PS3.5 A.5): a few kilobytes that inflate to
many megabytes, sent by C-STORE and by STOW-RS to the real server. Past ``[storage]
max_inflated_bytes`` they are refused out of resources (0xA700) with an Error Comment /
FailureReason, and nothing is stored; a deflated instance under the bound is stored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian
from pynetdicom import AE

from gateway.core import Gateway
from gateway.models import Instance
from tests.support.common import LiveServer, ct_dataset, make_settings, part10
from tests.support.dicomweb_helpers import api_key, multipart_body, raw

LIMIT = 8 * 1024 * 1024
OUT_OF_RESOURCES = 0xA700


@pytest.fixture
def live(tmp_path: Path, database_url: str) -> Iterator[LiveServer]:
    settings = make_settings(tmp_path, database_url,
                             GATEWAY_STORAGE_MAX_INFLATED_BYTES=str(LIMIT))
    with Gateway(settings) as gateway, LiveServer(gateway) as server:
        yield server


def bomb(index: int = 0) -> Dataset:
    """A CT whose 32 MiB of pixel data are zeros: about 32 KB once deflated."""
    ds = ct_dataset(index, study="1.2.826.0.1.3680043.8.498.66")
    ds.Rows = ds.Columns = 4096
    ds.PixelData = bytes(4096 * 4096 * 2)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return ds


def stored(live: LiveServer) -> tuple[int, list[Path]]:
    with live.gateway.index.Session() as session:
        rows = session.query(Instance).count()
    files = [p for p in (live.gateway.settings.data_dir / "files").rglob("*.dcm")]
    return rows, files


def store(live: LiveServer, ds: Dataset) -> Dataset:
    ae = AE(ae_title="DEFLSCU")
    ae.add_requested_context(CTImageStorage, DeflatedExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", live.dimse_port, ae_title=live.ae_title)
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def test_a_c_store_inflating_past_the_bound_is_refused_a700(live: LiveServer) -> None:
    status = store(live, bomb())
    assert status.Status == OUT_OF_RESOURCES
    assert "max_inflated_bytes" in status.ErrorComment
    assert stored(live) == (0, [])
    # Under the bound, deflated instances are stored as ever.
    small = ct_dataset(1, study="1.2.826.0.1.3680043.8.498.66")
    small.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    assert store(live, small).Status == 0x0000
    assert stored(live)[0] == 1


def test_a_stow_part_inflating_past_the_bound_is_refused_a700(live: LiveServer) -> None:
    ds = bomb(2)
    data = part10(ds)
    assert len(data) < 200_000
    token = api_key(live.gateway, "writer", "dicomweb:write")
    reply = raw(live.http_url + "/dicomweb/studies", method="POST",
                body=multipart_body([("application/dicom", data)]),
                headers={"Authorization": f"Bearer {token}",
                         "Content-Type": 'multipart/related; type="application/dicom"; '
                                         "boundary=XyZzYboundary"})
    assert reply.status == 409
    answer = Dataset.from_json(json.loads(reply.body))
    (failed,) = answer.FailedSOPSequence
    assert (failed.ReferencedSOPInstanceUID, failed.FailureReason) == (
        ds.SOPInstanceUID, OUT_OF_RESOURCES)
    assert stored(live) == (0, [])
