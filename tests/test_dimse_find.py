"""C-FIND SCP over real associations on 127.0.0.1 (PS3.4 C.4.1), pynetdicom and dcmtk findscu.

Every matching kind of PS3.4 C.2.2.2 the engine supports (single value, list of UIDs, wildcard,
range, universal) at every level of both information models, character sets, cancel, refusals.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence
from pynetdicom import AE
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from gateway.audit import events_for_patient
from gateway.core import Gateway
from sample_dicom.generator import SeriesSpec, StudySpec
from tests.support.common import LiveServer
from tests.support.qr_helpers import identifier, load_sequence_studies, load_study, qr_settings

needs_dcmtk = pytest.mark.skipif(shutil.which("findscu") is None,
                                 reason="dcmtk is not installed (make test installs it)")
PENDING, SUCCESS, CANCEL = 0xFF00, 0x0000, 0xFE00
BAD_IDENTIFIER, NOT_AUTHORIZED = 0xA900, 0x0124
STUDY_ROOT, PATIENT_ROOT = (StudyRootQueryRetrieveInformationModelFind,
                            PatientRootQueryRetrieveInformationModelFind)

CT = SeriesSpec(modality="CT", instances=2, rows=16, columns=16)
MR = SeriesSpec(modality="MR", description="T2 axial", instances=1, rows=16, columns=16)
SPECS = [
    StudySpec(patient_id="LU0000001", patient_name="Müller^Zoé", study_date="20240315",
              study_time="093000", accession_number="ACC1", description="CT Schädel",
              series=(CT, MR), key_object=False),
    StudySpec(patient_id="LU0000001", patient_name="Müller^Zoé", study_date="20250110",
              study_time="141500", accession_number="ACC2", description="MR Knie",
              series=(MR,), key_object=False),
    StudySpec(patient_id="LU0000002", patient_name="Schmit^Jérôme", patient_sex="M",
              study_date="20230610", study_time="080000", accession_number="ACC3",
              description="CT Thorax", series=(CT,), key_object=False),
    StudySpec(patient_id="LU0000003", patient_name="Łukasz^Ørsted", patient_sex="M",
              study_date="20240316", accession_number="ACC4", description="CT Abdomen",
              series=(CT,), key_object=False),
]


class Archive:
    def __init__(self, live: LiveServer, studies: list[list[Dataset]]) -> None:
        self.live = live
        self.studies = studies

    def uid(self, index: int) -> str:
        return str(self.studies[index][0].StudyInstanceUID)

    def find(self, ds: Dataset, *, model: str = STUDY_ROOT, calling: str = "TESTSCU",
             cancel_after: int | None = None, by_pynetdicom: bool = False
             ) -> list[tuple[int, Dataset | None]]:
        ae = AE(ae_title=calling)
        ae.add_requested_context(model)
        negotiation = []
        if by_pynetdicom:
            # User Identity Negotiation: pynetdicom runs this association, not dimse.loop.acceptor.
            identity = UserIdentityNegotiation()
            identity.user_identity_type = 1
            identity.primary_field = b"radiologist"
            negotiation = [identity]
        assoc = ae.associate("127.0.0.1", self.live.dimse_port, ae_title="DICOMGW",
                             ext_neg=negotiation)
        assert assoc.is_established
        context_id = next(cx.context_id for cx in assoc.accepted_contexts
                          if cx.abstract_syntax == model)
        out: list[tuple[int, Dataset | None]] = []
        if cancel_after == 0:
            # C-CANCEL while the SCP is still searching (PS3.7 9.3.2.3). pynetdicom drops a
            # C-CANCEL that arrives before it starts serving the request, hence the delay.
            threading.Timer(0.005, assoc.send_c_cancel, (3, context_id)).start()
        try:
            for status, found in assoc.send_c_find(ds, model, msg_id=3):
                out.append((int(status.Status), found))
                if cancel_after and len(out) == cancel_after:
                    assoc.send_c_cancel(3, context_id)
        finally:
            assoc.release()
        return out


@pytest.fixture
def archive(tmp_path: Path, database_url: str) -> Iterator[Archive]:
    settings = qr_settings(tmp_path, database_url,
                           peers={"NOFIND": {"find": False, "move": True, "get": True}})
    gateway = Gateway(settings).open()
    try:
        studies = [load_study(gateway, spec, seed=i) for i, spec in enumerate(SPECS)]
        with LiveServer(gateway) as live:
            yield Archive(live, studies)
    finally:
        gateway.close()


def matches(responses: list[tuple[int, Dataset | None]]) -> list[Dataset]:
    assert responses[-1][0] == SUCCESS, hex(responses[-1][0])
    assert all(s == PENDING for s, _ in responses[:-1])
    return [ds for _s, ds in responses[:-1] if ds is not None]


def values(found: list[Dataset], keyword: str) -> list[str]:
    return sorted(str(ds.get(keyword, "")) for ds in found)


# -- STUDY level: each matching kind ---------------------------------------------------------
def test_single_value_returns_only_the_requested_keys(archive: Archive) -> None:
    found = matches(archive.find(identifier("STUDY", PatientID="LU0000001",
                                            StudyInstanceUID="", StudyDate="")))
    assert values(found, "StudyDate") == ["20240315", "20250110"]
    for ds in found:
        assert {e.keyword for e in ds} <= {"QueryRetrieveLevel", "PatientID",
                                           "StudyInstanceUID", "StudyDate",
                                           "SpecificCharacterSet"}
        assert ds.QueryRetrieveLevel == "STUDY"


@pytest.mark.parametrize("query", [
    identifier("STUDY", PatientName="", PatientID="", StudyDate="", AccessionNumber="",
               ModalitiesInStudy="", NumberOfStudyRelatedInstances="", RetrieveAETitle=""),
    identifier("SERIES", StudyInstanceUID="", SeriesInstanceUID="", Modality="",
               SeriesDescription="", NumberOfSeriesRelatedInstances=""),
    identifier("IMAGE", SOPInstanceUID="", InstanceNumber="", Rows=""),
])
def test_both_ways_of_running_an_association_answer_the_same(archive: Archive,
                                                             query: Dataset) -> None:
    ours = matches(archive.find(query))
    theirs = matches(archive.find(query, by_pynetdicom=True))
    assert len(ours) > 1
    assert [ds.to_json_dict() for ds in ours] == [ds.to_json_dict() for ds in theirs]


def test_list_of_uids(archive: Archive) -> None:
    found = matches(archive.find(identifier(
        "STUDY", StudyInstanceUID=[archive.uid(0), archive.uid(2)], AccessionNumber="")))
    assert values(found, "AccessionNumber") == ["ACC1", "ACC3"]


def test_wildcards_and_person_names(archive: Archive) -> None:
    found = matches(archive.find(identifier("STUDY", PatientName="Mül*", StudyDate="")))
    assert len(found) == 2
    assert all(str(ds.PatientName) == "Müller^Zoé" for ds in found)
    found = matches(archive.find(identifier("STUDY", AccessionNumber="ACC?",
                                            StudyDescription="CT*")))
    assert values(found, "AccessionNumber") == ["ACC1", "ACC3", "ACC4"]


def test_date_and_time_ranges(archive: Archive) -> None:
    found = matches(archive.find(identifier("STUDY", StudyDate="20240101-20241231",
                                            AccessionNumber="")))
    assert values(found, "AccessionNumber") == ["ACC1", "ACC4"]
    found = matches(archive.find(identifier("STUDY", StudyDate="-20231231",
                                            AccessionNumber="")))
    assert values(found, "AccessionNumber") == ["ACC3"]
    found = matches(archive.find(identifier("STUDY", StudyTime="1200-",
                                            AccessionNumber="")))
    assert values(found, "AccessionNumber") == ["ACC2"]


def test_universal_matching_and_computed_keys(archive: Archive) -> None:
    found = matches(archive.find(identifier(
        "STUDY", StudyInstanceUID="", ModalitiesInStudy="", NumberOfStudyRelatedSeries="",
        NumberOfStudyRelatedInstances="", RetrieveAETitle="")))
    assert len(found) == 4
    first = next(ds for ds in found if ds.StudyInstanceUID == archive.uid(0))
    assert list(first.ModalitiesInStudy) == ["CT", "MR"]
    assert (first.NumberOfStudyRelatedSeries, first.NumberOfStudyRelatedInstances) == (2, 3)
    assert first.RetrieveAETitle == "DICOMGW"
    found = matches(archive.find(identifier("STUDY", ModalitiesInStudy="MR",
                                            AccessionNumber="")))
    assert values(found, "AccessionNumber") == ["ACC1", "ACC2"]


def test_no_match_is_plain_success(archive: Archive) -> None:
    assert archive.find(identifier("STUDY", PatientID="NOBODY"))[-1][0] == SUCCESS
    assert len(archive.find(identifier("STUDY", PatientID="NOBODY"))) == 1


# -- SERIES, IMAGE and PATIENT levels --------------------------------------------------------
def test_series_level(archive: Archive) -> None:
    found = matches(archive.find(identifier(
        "SERIES", StudyInstanceUID=archive.uid(0), SeriesInstanceUID="", Modality="",
        NumberOfSeriesRelatedInstances="")))
    assert sorted((str(ds.Modality), int(ds.NumberOfSeriesRelatedInstances))
                  for ds in found) == [("CT", 2), ("MR", 1)]
    found = matches(archive.find(identifier("SERIES", StudyInstanceUID=archive.uid(0),
                                            Modality="MR", SeriesInstanceUID="")))
    assert len(found) == 1


def test_image_level(archive: Archive) -> None:
    ct = [ds for ds in archive.studies[0] if ds.Modality == "CT"]
    found = matches(archive.find(identifier(
        "IMAGE", StudyInstanceUID=archive.uid(0), SeriesInstanceUID=ct[0].SeriesInstanceUID,
        SOPInstanceUID="", InstanceNumber="", SOPClassUID="")))
    assert values(found, "SOPInstanceUID") == sorted(str(ds.SOPInstanceUID) for ds in ct)
    found = matches(archive.find(identifier(
        "IMAGE", StudyInstanceUID=archive.uid(0), SeriesInstanceUID=ct[0].SeriesInstanceUID,
        SOPInstanceUID=[ct[1].SOPInstanceUID], InstanceNumber="")))
    assert [int(ds.InstanceNumber) for ds in found] == [int(ct[1].InstanceNumber)]


def test_patient_root_patient_level(archive: Archive) -> None:
    found = matches(archive.find(identifier(
        "PATIENT", PatientID="", PatientName="", NumberOfPatientRelatedStudies="",
        NumberOfPatientRelatedInstances=""), model=PATIENT_ROOT))
    by_id = {str(ds.PatientID): ds for ds in found}
    assert set(by_id) == {"LU0000001", "LU0000002", "LU0000003"}
    assert int(by_id["LU0000001"].NumberOfPatientRelatedStudies) == 2
    assert int(by_id["LU0000001"].NumberOfPatientRelatedInstances) == 4
    assert by_id["LU0000001"].QueryRetrieveLevel == "PATIENT"
    found = matches(archive.find(identifier("PATIENT", PatientName="SCHMIT*", PatientID=""),
                                 model=PATIENT_ROOT))
    assert values(found, "PatientID") == ["LU0000002"]


def test_patient_root_study_level(archive: Archive) -> None:
    found = matches(archive.find(identifier("STUDY", PatientID="LU0000002",
                                            StudyInstanceUID=""), model=PATIENT_ROOT))
    assert values(found, "StudyInstanceUID") == [archive.uid(2)]


# -- character sets --------------------------------------------------------------------------
def test_query_character_set_is_honoured(archive: Archive) -> None:
    query = identifier("STUDY", PatientName="Müller*", AccessionNumber="")
    query.SpecificCharacterSet = "ISO_IR 100"  # Latin-1 on the wire
    found = matches(archive.find(query))
    assert len(found) == 2
    assert all(ds.SpecificCharacterSet == "ISO_IR 100" for ds in found)
    assert all(str(ds.PatientName) == "Müller^Zoé" for ds in found)


def test_results_that_do_not_fit_the_query_set_come_in_utf8(archive: Archive) -> None:
    query = identifier("STUDY", PatientID="LU0000003", PatientName="")
    query.SpecificCharacterSet = "ISO_IR 100"
    (found,) = matches(archive.find(query))
    assert found.SpecificCharacterSet == "ISO_IR 192"
    assert str(found.PatientName) == "Łukasz^Ørsted"


# -- cancel and refusals ---------------------------------------------------------------------
@pytest.fixture
def many_matches(tmp_path: Path, database_url: str) -> Iterator[Archive]:
    """250 instances: enough Pending responses for a C-CANCEL to arrive before the last."""
    gateway = Gateway(qr_settings(tmp_path, database_url)).open()
    try:
        load_study(gateway, StudySpec(series=(SeriesSpec(instances=250, rows=8, columns=8),),
                                      key_object=False))
        with LiveServer(gateway) as live:
            yield Archive(live, [])
    finally:
        gateway.close()


# A C-CANCEL races the SCP's Pending responses: on a loaded machine the SCU may be scheduled
# too late to stop 250 of them. Up to three tries; cancel must take effect in one of them.
CANCEL_TRIES = 3


def test_cancel(many_matches: Archive) -> None:
    outcomes = []
    for _ in range(CANCEL_TRIES):
        responses = many_matches.find(identifier("IMAGE", SOPInstanceUID="", ImageType=""),
                                      cancel_after=0)
        outcomes.append((responses[-1][0], len(responses)))
        if responses[-1][0] == CANCEL:
            break
    status, count = outcomes[-1]
    assert status == CANCEL, outcomes
    assert count < 250


def test_denied_peer(archive: Archive) -> None:
    responses = archive.find(identifier("STUDY", PatientID=""), calling="NOFIND")
    assert [s for s, _ in responses] == [NOT_AUTHORIZED]


@pytest.mark.parametrize("model, ds", [
    (STUDY_ROOT, identifier("PATIENT", PatientID="")),
    (STUDY_ROOT, identifier("WARD", PatientID="")),
    (STUDY_ROOT, identifier("STUDY", StudyDate="20241345")),
    (STUDY_ROOT, identifier("STUDY", StudyInstanceUID="1.2.*")),
    (STUDY_ROOT, identifier("STUDY", Modality="CT")),
    (PATIENT_ROOT, identifier("PATIENT", StudyDate="20240315")),
], ids=["patient-in-study-root", "bad-level", "bad-date", "uid-wildcard",
        "series-key-at-study", "study-key-at-patient"])
def test_invalid_identifier_is_a900(archive: Archive, model: str, ds: Dataset) -> None:
    assert [s for s, _ in archive.find(ds, model=model)] == [BAD_IDENTIFIER]


# -- dcmtk findscu ---------------------------------------------------------------------------
def findscu(archive: Archive, out: Path, *keys: str, model: str = "-S",
            calling: str = "FINDSCU", extra: tuple[str, ...] = ()
            ) -> tuple[subprocess.CompletedProcess[str], list[Dataset]]:
    out.mkdir(exist_ok=True)
    args = ["findscu", "-v", model, "-aet", calling, "-aec", "DICOMGW", "-X", "-od", str(out),
            *extra]
    for key in keys:
        args += ["-k", key]
    args += ["127.0.0.1", str(archive.live.dimse_port)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    return result, [dcmread(p) for p in sorted(out.iterdir())]


@needs_dcmtk
@pytest.mark.parametrize("model, keys, key, expected", [
    ("-P", ["QueryRetrieveLevel=PATIENT", "PatientID=LU000000?", "PatientName"],
     "PatientID", ["LU0000001", "LU0000002", "LU0000003"]),
    ("-S", ["QueryRetrieveLevel=STUDY", "PatientID=LU0000001", "AccessionNumber"],
     "AccessionNumber", ["ACC1", "ACC2"]),
    ("-S", ["QueryRetrieveLevel=STUDY", "StudyDate=20240101-20241231", "AccessionNumber"],
     "AccessionNumber", ["ACC1", "ACC4"]),
    ("-S", ["QueryRetrieveLevel=STUDY", "StudyDescription=CT*", "AccessionNumber"],
     "AccessionNumber", ["ACC1", "ACC3", "ACC4"]),
    ("-S", ["QueryRetrieveLevel=SERIES", "StudyInstanceUID={uid0}", "Modality",
            "SeriesInstanceUID"], "Modality", ["CT", "MR"]),
    ("-S", ["QueryRetrieveLevel=IMAGE", "StudyInstanceUID={uid2}", "SeriesInstanceUID",
            "SOPInstanceUID", "InstanceNumber"], "InstanceNumber", ["1", "2"]),
], ids=["patient-wildcard", "study-single", "study-range", "study-wildcard", "series",
        "image"])
def test_findscu(archive: Archive, tmp_path: Path, model: str, keys: list[str], key: str,
                 expected: list[str]) -> None:
    keys = [k.format(uid0=archive.uid(0), uid2=archive.uid(2)) for k in keys]
    result, found = findscu(archive, tmp_path / "rsp", *keys, model=model)
    assert result.returncode == 0, result.stderr
    assert values(found, key) == expected


@needs_dcmtk
def test_findscu_list_of_uids(archive: Archive, tmp_path: Path) -> None:
    result, found = findscu(archive, tmp_path / "rsp", "QueryRetrieveLevel=STUDY",
                            f"StudyInstanceUID={archive.uid(1)}\\{archive.uid(3)}",
                            "AccessionNumber")
    assert result.returncode == 0, result.stderr
    assert values(found, "AccessionNumber") == ["ACC2", "ACC4"]


@needs_dcmtk
def test_findscu_cancel(many_matches: Archive, tmp_path: Path) -> None:
    cancelled = "Received Final Find Response (Cancel: MatchingTerminatedDueToCancelRequest)"
    for attempt in range(CANCEL_TRIES):
        result, found = findscu(many_matches, tmp_path / f"rsp{attempt}",
                                "QueryRetrieveLevel=IMAGE", "SOPInstanceUID",
                                extra=("--cancel", "1"))
        output = result.stdout + result.stderr
        if cancelled in output:
            break
    assert cancelled in output, output
    assert len(found) < 250


@needs_dcmtk
def test_findscu_denied_peer(archive: Archive, tmp_path: Path) -> None:
    result, found = findscu(archive, tmp_path / "rsp", "QueryRetrieveLevel=STUDY",
                            "PatientID", calling="NOFIND")
    output = result.stdout + result.stderr
    assert "0x0124" in output.lower() or "0x124" in output.lower(), output
    assert found == []


def test_access_trail_names_the_calling_ae_and_studies_not_the_patient(
        archive: Archive, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="dimse.audit")
    matches(archive.find(identifier("STUDY", PatientID="LU0000002", PatientName=""),
                         calling="WORKSTATION1"))
    archive.find(identifier("STUDY", PatientID=""), calling="NOFIND")
    lines = [r.getMessage() for r in caplog.records if r.name == "dimse.audit"]
    assert len(lines) == 2
    assert lines[0].startswith("audit 110112 success by dimse:WORKSTATION1 from 127.0.0.1")
    assert archive.uid(2) in lines[0]
    assert lines[1].startswith("audit 110112 failure by dimse:NOFIND from 127.0.0.1")
    assert not any("Schmit" in line or "LU0000002" in line for line in lines)
    # ... and in the persistent trail, queryable per patient (PS3.15 A.5.3, 110112 Query).
    (entry,) = events_for_patient(archive.live.gateway.index, "LU0000002")
    assert (entry.action, entry.actor, entry.address, entry.study_instance_uid,
            entry.outcome) == ("query", "dimse:WORKSTATION1", "127.0.0.1", archive.uid(2), 0)


# -- sequence matching (PS3.4 C.2.2.2.6) -----------------------------------------------------
@pytest.fixture
def seq_archive(tmp_path: Path, database_url: str) -> Iterator[Archive]:
    gateway = Gateway(qr_settings(tmp_path, database_url)).open()
    try:
        studies = load_sequence_studies(gateway)
        with LiveServer(gateway) as live:
            yield Archive(live, studies)
    finally:
        gateway.close()


def sequence_key(**item_keys: str) -> Sequence:
    item = Dataset()
    for keyword, value in item_keys.items():
        setattr(item, keyword, value)
    return Sequence([item])


def test_sequence_matching_at_series_level(seq_archive: Archive) -> None:
    found = matches(seq_archive.find(identifier(
        "SERIES", Modality="", SeriesInstanceUID="",
        RequestAttributesSequence=sequence_key(ScheduledProcedureStepID="SPS1",
                                               RequestedProcedureID=""))))
    assert values(found, "Modality") == ["CT"]
    # The matching item only, with the item keys asked for only (C.4.1.1.3.2).
    (item,) = found[0].RequestAttributesSequence
    assert (item.ScheduledProcedureStepID, item.RequestedProcedureID) == ("SPS1", "RP1")
    assert "AccessionNumber" not in item
    # Wildcards, and every item key must match in the same item.
    found = matches(seq_archive.find(identifier(
        "SERIES", Modality="",
        RequestAttributesSequence=sequence_key(ScheduledProcedureStepID="SPS*"))))
    assert values(found, "Modality") == ["CT", "MR"]
    ct = next(ds for ds in found if ds.Modality == "CT")
    assert [i.ScheduledProcedureStepID for i in ct.RequestAttributesSequence] == ["SPS1",
                                                                                "SPS1B"]
    found = matches(seq_archive.find(identifier(
        "SERIES", Modality="", RequestAttributesSequence=sequence_key(
            ScheduledProcedureStepID="SPS1", RequestedProcedureID="RP1B"))))
    assert found == []
    found = matches(seq_archive.find(identifier(
        "SERIES", Modality="",
        RequestAttributesSequence=sequence_key(AccessionNumber="SEQ1"))))
    assert values(found, "Modality") == ["CT"]


def test_empty_sequence_key_is_universal_and_returns_the_sequence(seq_archive: Archive) -> None:
    found = matches(seq_archive.find(identifier("SERIES", Modality="",
                                                RequestAttributesSequence=Sequence())))
    assert values(found, "Modality") == ["CT", "MR", "MR"]
    ct = next(ds for ds in found if ds.Modality == "CT")
    assert [i.RequestedProcedureID for i in ct.RequestAttributesSequence] == ["RP1", "RP1B"]
    assert [len(ds.RequestAttributesSequence) for ds in found
            if ds.Modality == "MR"] in ([1, 0], [0, 1])


def test_sequence_matching_at_study_level(seq_archive: Archive) -> None:
    found = matches(seq_archive.find(identifier(
        "STUDY", AccessionNumber="",
        ProcedureCodeSequence=sequence_key(CodeValue="MRKNEE", CodingSchemeDesignator=""))))
    assert values(found, "AccessionNumber") == ["SEQ2"]
    assert found[0].ProcedureCodeSequence[0].CodingSchemeDesignator == "LOCAL"
    found = matches(seq_archive.find(identifier(
        "STUDY", AccessionNumber="",
        IssuerOfAccessionNumberSequence=sequence_key(LocalNamespaceEntityID="HOSP_?"))))
    assert values(found, "AccessionNumber") == ["SEQ1"]
    # A study-level sequence at the series level filters the series of matching studies.
    found = matches(seq_archive.find(identifier(
        "SERIES", Modality="", ProcedureCodeSequence=sequence_key(CodeValue="CT*"))))
    assert values(found, "Modality") == ["CT", "MR"]


@pytest.mark.parametrize("ds", [
    identifier("SERIES", RequestAttributesSequence=Sequence(
        [*sequence_key(ScheduledProcedureStepID="A"), *sequence_key(
            ScheduledProcedureStepID="B")])),
    identifier("STUDY", RequestAttributesSequence=sequence_key(ScheduledProcedureStepID="A")),
], ids=["two-items", "series-sequence-at-study-level"])
def test_invalid_sequence_key_is_a900(seq_archive: Archive, ds: Dataset) -> None:
    assert seq_archive.find(ds) == [(BAD_IDENTIFIER, None)]


@needs_dcmtk
def test_findscu_sequence_matching(seq_archive: Archive, tmp_path: Path) -> None:
    result, found = findscu(seq_archive, tmp_path / "rsp", "QueryRetrieveLevel=SERIES",
                            "Modality",
                            "RequestAttributesSequence[0].ScheduledProcedureStepID=SPS2",
                            "RequestAttributesSequence[0].RequestedProcedureID")
    assert result.returncode == 0, result.stderr
    assert values(found, "Modality") == ["MR"]
    (item,) = found[0].RequestAttributesSequence
    assert (item.ScheduledProcedureStepID, item.RequestedProcedureID) == ("SPS2", "RP2")


def test_access_trail_has_one_entry_per_matched_study_with_its_patient(archive: Archive) -> None:
    found = matches(archive.find(identifier("STUDY", PatientID="LU*", AccessionNumber=""),
                                 calling="WORKSTATION2"))
    assert len(found) == 4
    index = archive.live.gateway.index
    by_patient = {
        patient: sorted(e.study_instance_uid for e in events_for_patient(index, patient)
                        if e.actor == "dimse:WORKSTATION2")
        for patient in ("LU0000001", "LU0000002", "LU0000003")
    }
    assert by_patient == {
        "LU0000001": sorted([archive.uid(0), archive.uid(1)]),
        "LU0000002": [archive.uid(2)],
        "LU0000003": [archive.uid(3)],
    }
