"""The access trail has one vocabulary, exported as the conformance statement says; stores are
in it, once per association, STOW-RS request or ingest run (never once per instance).

The expected EventIDs are read from the table in docs/conformance.md, so the statement and the
code cannot drift apart."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from sqlalchemy import select

from gateway import audit
from gateway.cli import ingest_paths
from gateway.core import Gateway
from gateway.models import AuditRecord
from tests.support.common import LiveServer, ct_dataset, part10
from tests.support.dimse_helpers import associate, wait_until

CONFORMANCE = Path(__file__).resolve().parent.parent / "docs" / "conformance.md"
STUDY_A = "1.2.826.0.1.3680043.8.498.91"
STUDY_B = "1.2.826.0.1.3680043.8.498.92"


def conformance_events() -> dict[str, tuple[str, str, str]]:
    """Action -> (EventID, event name, EventActionCode), from the access trail table."""
    text = CONFORMANCE.read_text()
    section = text[text.index("### Access trail (PS3.15 A.5)"):]
    section = section[:section.index("\n## ")]
    rows: dict[str, tuple[str, str, str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"`[a-z.]+`", cells[0]):
            rows[cells[0].strip("`")] = (cells[2], cells[3], cells[4])
    return rows


def trail(gateway: Gateway, action: audit.Action | None = None) -> list[AuditRecord]:
    with gateway.index.Session() as session:
        query = select(AuditRecord).order_by(AuditRecord.pk)
        if action is not None:
            query = query.where(AuditRecord.action == action.value)
        return list(session.scalars(query))


def test_every_action_is_exported_with_the_event_of_the_conformance_statement(
        gateway: Gateway) -> None:
    documented = conformance_events()
    assert set(documented) == {a.value for a in audit.Action}, "the table names every action"
    for action in audit.Action:
        audit.record(gateway.index, action, actor="api_key:ops", address="127.0.0.1",
                     study_uid=STUDY_A, patient_id="P-1", instance_uids=["1.2.3.4"],
                     detail=f"the {action.value} test")
    entries = trail(gateway)
    assert [e.action for e in entries] == [a.value for a in audit.Action]  # one per action
    for entry in entries:
        code, meaning, action_code = documented[entry.action]
        resource = audit.fhir_audit_event(entry)
        FhirAuditEvent.model_validate(resource)
        assert resource["type"]["code"] == code, entry.action
        assert resource["type"]["display"] == meaning
        assert resource["action"] == action_code
        message = ET.fromstring(audit.dicom_audit_message(entry))
        ident = message.find("EventIdentification")
        assert ident is not None
        assert ident.get("EventActionCode") == action_code, entry.action
        event_id = ident.find("EventID")
        assert event_id is not None
        assert (event_id.get("csd-code"), event_id.get("codeSystemName"),
                event_id.get("originalText")) == (code, "DCM", meaning), entry.action
        roles = [p.find("RoleIDCode").get("csd-code")  # type: ignore[union-attr]
                 for p in message.findall("ActiveParticipant")]
        # the requestor sends a store to the gateway; every other event goes the other way
        assert roles == (["110153", "110152"] if entry.action == "store"
                         else ["110152", "110153"]), entry.action


def identity_association(port: int) -> Any:
    """A storage association with User Identity Negotiation (PS3.7 D.3.3.7): one the own
    association loop leaves to pynetdicom."""
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 1
    identity.primary_field = b"radiographer"
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    return ae.associate("127.0.0.1", port, ae_title="DICOMGW", ext_neg=[identity])


def _datasets() -> list[Any]:
    out = []
    for i in range(3):
        out.append(ct_dataset(i, study=STUDY_A, series=f"{STUDY_A}.1", rows=8))
    for i in range(2):
        ds = ct_dataset(i, study=STUDY_B, series=f"{STUDY_B}.1", rows=8)
        ds.PatientID = "P-B"
        out.append(ds)
    return out


def _stores_recorded(gateway: Gateway, count: int) -> bool:
    return len(trail(gateway, audit.Action.STORE)) >= count


def _check_store_entries(gateway: Gateway, datasets: list[Any], actor: str) -> None:
    entries = trail(gateway, audit.Action.STORE)
    assert sorted(e.study_instance_uid or "" for e in entries) == [STUDY_A, STUDY_B]
    for entry in entries:
        sent = [str(ds.SOPInstanceUID) for ds in datasets
                if ds.StudyInstanceUID == entry.study_instance_uid]
        assert json.loads(entry.instance_uids or "[]") == sent
        assert entry.actor == actor and entry.outcome == audit.Outcome.SUCCESS
        assert f"({len(sent)} instances)" in entry.detail
        assert entry.patient_id == ("P-B" if entry.study_instance_uid == STUDY_B
                                    else str(datasets[0].PatientID))
        code = audit.fhir_audit_event(entry)
        assert (code["type"]["code"], code["action"]) == ("110104", "C")


@pytest.mark.parametrize("way", ["own loop", "pynetdicom"])
def test_an_association_is_one_store_entry_per_study(live: LiveServer, way: str) -> None:
    gateway = live.gateway
    datasets = _datasets()
    assoc = (associate(live.dimse_port) if way == "own loop"
             else identity_association(live.dimse_port))
    assert assoc.is_established
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0x0000
        assert trail(gateway, audit.Action.STORE) == []  # nothing per instance
    finally:
        assoc.release()
    assert wait_until(lambda: _stores_recorded(gateway, 2))
    _check_store_entries(gateway, datasets, "dimse:TESTSCU")


def test_an_aborted_association_records_what_it_stored(live: LiveServer) -> None:
    datasets = _datasets()
    assoc = associate(live.dimse_port)
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.abort()
    assert wait_until(lambda: _stores_recorded(live.gateway, 2))
    _check_store_entries(live.gateway, datasets, "dimse:TESTSCU")


def test_a_cli_ingest_run_is_one_store_entry_per_study(gateway: Gateway,
                                                       tmp_path: Path) -> None:
    datasets = _datasets()
    folder = tmp_path / "in"
    folder.mkdir()
    for i, ds in enumerate(datasets):
        (folder / f"{i:02d}.dcm").write_bytes(part10(ds))
    (folder / "junk.dcm").write_bytes(b"not dicom")
    counts, rejected = ingest_paths(gateway, [str(folder)], progress=False, workers=1)
    assert counts["stored"] == len(datasets) and len(rejected) == 1
    entries = trail(gateway, audit.Action.STORE)
    assert all(e.actor.startswith("cli:") for e in entries)
    _check_store_entries(gateway, datasets, entries[0].actor)
    assert all("ingest: 5 stored, 1 rejected" in e.detail for e in entries)
