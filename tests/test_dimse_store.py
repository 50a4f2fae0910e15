"""C-ECHO and C-STORE over real associations on 127.0.0.1 (pynetdicom and dcmtk as SCUs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, MRImageStorage
from pynetdicom import AE
from sqlalchemy import func, select

from dimse.status import (
    CANNOT_UNDERSTAND,
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    DUPLICATE_SOP_INSTANCE,
    NOT_AUTHORIZED,
    OUT_OF_RESOURCES,
)
from gateway.core import Gateway
from gateway.metadata import dataset_offset
from gateway.models import Instance, Study
from gateway.storage import FileStorage
from tests.support.common import (
    LiveServer,
    ct_dataset,
    make_settings,
    part10,
    stored_relpaths,
    study_counts,
)
from tests.support.dimse_helpers import associate, association_rejection, send_raw_store

SAMPLE_FILES = sorted((Path(__file__).parent.parent / "sample_dicom" / "files").glob("*.dcm"))
needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None,
                                 reason="dcmtk is not installed (make test installs it)")


def stored_files(gateway: Gateway) -> list[str]:
    return stored_relpaths(gateway)


def instance_count(gateway: Gateway) -> int:
    with gateway.index.Session() as session:
        return session.scalar(select(func.count()).select_from(Instance)) or 0


def dataset_bytes(data: bytes) -> bytes:
    return data[dataset_offset(data):]


def test_echo_with_pynetdicom(live: LiveServer) -> None:
    assoc = associate(live.dimse_port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


@needs_dcmtk
def test_echo_with_echoscu(live: LiveServer) -> None:
    result = subprocess.run(
        ["echoscu", "-aec", live.ae_title, "127.0.0.1", str(live.dimse_port)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_store_is_durable_indexed_and_as_received(live: LiveServer) -> None:
    gateway = live.gateway
    ds = ct_dataset(0)
    assoc = associate(live.dimse_port)
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0x0000

    row = gateway.index.find_instance(ds.SOPInstanceUID)
    assert row is not None
    path = gateway.storage.path(row.file_path)
    stored = path.read_bytes()
    # Kept as received: the data set bytes are the ones the SCU encoded.
    assert dataset_bytes(stored) == dataset_bytes(part10(ds))
    assert dcmread(path).PatientName == "Müller^Zoé"
    metadata = json.loads(row.metadata_json)
    assert metadata["00100010"]["Value"][0]["Alphabetic"] == "Müller^Zoé"
    assert metadata["7FE00010"]["BulkDataURI"].endswith(
        f"instances/{ds.SOPInstanceUID}/bulk/7FE00010")
    assert study_counts(gateway, ds.StudyInstanceUID) == (1, 1, "CT")
    if isinstance(gateway.storage, FileStorage):
        assert not gateway.storage.unfinished()


def test_counts_and_modalities_follow_new_series(live: LiveServer) -> None:
    study = "1.2.826.0.1.3680043.8.498.7"
    assoc = associate(live.dimse_port, contexts=[CTImageStorage, MRImageStorage])
    for i in range(3):
        assert assoc.send_c_store(ct_dataset(i, study=study)).Status == 0
    mr = ct_dataset(0, study=study, series=f"{study}.2")
    mr.SOPClassUID = MRImageStorage
    mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
    mr.Modality = "MR"
    assert assoc.send_c_store(mr).Status == 0
    assoc.release()
    assert study_counts(live.gateway, study) == (2, 4, "CT\\MR")


# storescu's option proposing each syntax (with the uncompressed ones as fallback).
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.1": "-R",
    "1.2.840.10008.1.2": "-R",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.5": "-xr",
}
STORESCU_FILES = [p for p in SAMPLE_FILES
                  if dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID
                  in STORESCU_PROPOSE]


def assert_stored_as_sent(live: LiveServer, path: Path) -> None:
    sent = dcmread(path, stop_before_pixels=True)
    row = live.gateway.index.find_instance(str(sent.SOPInstanceUID))
    assert row is not None
    assert row.transfer_syntax_uid == sent.file_meta.TransferSyntaxUID
    stored = live.gateway.storage.path(row.file_path).read_bytes()
    assert dataset_bytes(stored) == dataset_bytes(path.read_bytes())


@needs_dcmtk
@pytest.mark.parametrize("path", STORESCU_FILES, ids=[p.name for p in STORESCU_FILES])
def test_storescu_every_committed_transfer_syntax(live: LiveServer, path: Path) -> None:
    syntax = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    result = subprocess.run(
        ["storescu", "-aec", live.ae_title, STORESCU_PROPOSE[syntax],
         "127.0.0.1", str(live.dimse_port), str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Failed" not in result.stderr, result.stderr
    assert_stored_as_sent(live, path)


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=[p.name for p in SAMPLE_FILES])
def test_pynetdicom_every_committed_transfer_syntax(live: LiveServer, path: Path) -> None:
    """Including syntaxes dcmtk 3.6.7 cannot send (HTJ2K): sent as stored in the file."""
    sent = dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(sent.SOPClassUID, [sent.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", live.dimse_port, ae_title=live.ae_title)
    assert assoc.is_established
    assert assoc.send_c_store(path).Status == 0x0000
    assoc.release()
    assert_stored_as_sent(live, path)


def test_identical_resend_is_a_noop_success(live: LiveServer) -> None:
    ds = ct_dataset(0)
    assoc = associate(live.dimse_port)
    assert assoc.send_c_store(ds).Status == 0
    files_before = stored_files(live.gateway)
    assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    assert instance_count(live.gateway) == 1
    assert stored_files(live.gateway) == files_before


def test_different_instance_under_stored_uid_is_refused_and_original_kept(
    live: LiveServer,
) -> None:
    original = ct_dataset(0)
    assoc = associate(live.dimse_port)
    assert assoc.send_c_store(original).Status == 0
    row = live.gateway.index.find_instance(original.SOPInstanceUID)
    assert row is not None
    kept = live.gateway.storage.path(row.file_path).read_bytes()

    corrupted = ct_dataset(0)
    corrupted.PixelData = bytes(len(corrupted.PixelData))
    assert assoc.send_c_store(corrupted).Status == DUPLICATE_SOP_INSTANCE
    assoc.release()
    assert instance_count(live.gateway) == 1
    assert live.gateway.storage.path(row.file_path).read_bytes() == kept
    assert stored_files(live.gateway) == [row.file_path]


def test_overwrite_setting_replaces(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url, GATEWAY_STORAGE_OVERWRITE="true")
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        assoc = associate(live.dimse_port)
        assert assoc.send_c_store(ct_dataset(0)).Status == 0
        changed = ct_dataset(0)
        changed.PatientName = "Other^Name"
        assert assoc.send_c_store(changed).Status == 0
        assoc.release()
        row = gateway.index.find_instance(changed.SOPInstanceUID)
        assert row is not None
        assert dcmread(gateway.storage.path(row.file_path)).PatientName == "Other^Name"
        assert len(stored_files(gateway)) == 1
        assert instance_count(gateway) == 1


def _assert_nothing_kept(gateway: Gateway) -> None:
    assert instance_count(gateway) == 0
    assert stored_files(gateway) == []
    if isinstance(gateway.storage, FileStorage):
        assert not gateway.storage.unfinished()
    with gateway.index.Session() as session:
        assert session.scalar(select(func.count()).select_from(Study)) == 0


def test_garbage_bytes_cannot_be_understood(live: LiveServer) -> None:
    assoc = associate(live.dimse_port)
    status = send_raw_store(assoc, CTImageStorage, "1.2.3.4", os.urandom(4096))
    assoc.release()
    assert status == CANNOT_UNDERSTAND
    _assert_nothing_kept(live.gateway)


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.999])
def test_truncated_data_set_cannot_be_understood(live: LiveServer, cut: float) -> None:
    ds = ct_dataset(0)
    body = dataset_bytes(part10(ds))
    assoc = associate(live.dimse_port)
    status = send_raw_store(assoc, CTImageStorage, ds.SOPInstanceUID, body[: int(len(body) * cut)])
    assoc.release()
    assert status == CANNOT_UNDERSTAND
    _assert_nothing_kept(live.gateway)


def test_data_set_of_another_sop_class(live: LiveServer) -> None:
    ds = ct_dataset(0)
    assoc = associate(live.dimse_port, contexts=[CTImageStorage, MRImageStorage])
    status = send_raw_store(assoc, MRImageStorage, ds.SOPInstanceUID,
                            dataset_bytes(part10(ds)))
    assoc.release()
    assert status == DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    _assert_nothing_kept(live.gateway)


@pytest.mark.parametrize("field", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_path_traversal_uids_are_refused(live: LiveServer, field: str) -> None:
    ds = ct_dataset(0)
    bad = "../../../../tmp/evil"
    body = dataset_bytes(part10(ds))
    # Same length keeps the explicit-VR length fields valid.
    original = getattr(ds, field)
    replacement = (bad + "1" * 64)[: len(original)]
    if len(original) % 2:
        replacement = replacement[:-1] + "1"
    body = body.replace(original.encode(), replacement.encode(), 1)
    assoc = associate(live.dimse_port)
    sop = replacement if field == "SOPInstanceUID" else ds.SOPInstanceUID
    status = send_raw_store(assoc, CTImageStorage, sop, body)
    assoc.release()
    assert status in (CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
    _assert_nothing_kept(live.gateway)
    assert not (live.gateway.settings.data_dir / "tmp").exists()


def test_full_disk_is_out_of_resources(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url,
                             GATEWAY_STORAGE_MIN_FREE_BYTES=str(10**18))
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        assoc = associate(live.dimse_port)
        assert assoc.send_c_store(ct_dataset(0)).Status == OUT_OF_RESOURCES
        assoc.release()
        _assert_nothing_kept(gateway)


def test_wrong_called_ae_title_is_rejected(live: LiveServer) -> None:
    # rejected-permanent, by the service user: called AE title not recognized (PS3.8 9.3.4)
    assert association_rejection(live.dimse_port, called="NOTME") == (0x01, 0x01, 0x07)


def test_store_allow_list(tmp_path: Path, database_url: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[dimse.peers.MODALITY]\nstore = true\nhost = "127.0.0.1"\n')
    settings = make_settings(tmp_path, database_url, GATEWAY_CONFIG=str(config))
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        allowed = associate(live.dimse_port, calling="MODALITY")
        assert allowed.send_c_store(ct_dataset(0)).Status == 0
        allowed.release()
        stranger = associate(live.dimse_port, calling="STRANGER")
        assert stranger.send_c_echo().Status == 0
        assert stranger.send_c_store(ct_dataset(1)).Status == NOT_AUTHORIZED
        stranger.release()
        assert instance_count(gateway) == 1


def test_max_associations(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url, GATEWAY_DIMSE_MAX_ASSOCIATIONS="1")
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        first = associate(live.dimse_port)
        assert first.is_established
        try:
            # rejected-transient, by the service provider: local limit exceeded
            assert association_rejection(live.dimse_port) == (0x02, 0x03, 0x02)
        finally:
            first.release()


@needs_dcmtk
def test_storescu_folder_of_many(live: LiveServer, tmp_path: Path) -> None:
    folder = tmp_path / "send"
    folder.mkdir()
    for i in range(20):
        ct_dataset(i).save_as(folder / f"{i}.dcm", enforce_file_format=True)
    result = subprocess.run(
        ["storescu", "-aec", live.ae_title, "+sd", "+r", "127.0.0.1", str(live.dimse_port),
         str(folder)], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert instance_count(live.gateway) == 20


def test_open_store_on_a_network_address_is_warned(tmp_path: Path, database_url: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    from dimse.scp import start_server

    caplog.set_level("WARNING", logger="dimse.scp")
    settings = make_settings(tmp_path, database_url, GATEWAY_DIMSE_HOST="0.0.0.0",
                             GATEWAY_DIMSE_PORT="0")
    with Gateway(settings) as gateway:
        server = start_server(gateway)
        server.shutdown()
    assert any("any AE that reaches the port may store" in r.getMessage()
               for r in caplog.records)
