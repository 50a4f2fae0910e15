"""The access trail: append-only rows, FHIR AuditEvent and DICOM PS3.15 A.5 exports."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from sqlalchemy import delete, update
from sqlalchemy.exc import DatabaseError

from gateway import audit
from gateway.access import Principal, PrincipalKind
from gateway.core import Gateway
from gateway.models import AuditRecord
from tests.support.common import ct_dataset, part10

VIEWER = Principal(kind=PrincipalKind.VIEWER_SESSION, id="dr-1", display_name="Dr One",
                   relationship="trust_circle", jti="j-123",
                   study_uids=frozenset({"1.2.826.0.1.3680043.8.498.1"}))


def test_record_resolves_patient_and_exports(gateway: Gateway) -> None:
    gateway.ingestor.ingest(part10(ct_dataset(0)), source="test")
    audit.record(gateway.index, audit.Action.RETRIEVE, principal=VIEWER,
                 study_uid="1.2.826.0.1.3680043.8.498.1",
                 instance_uids=["1.2.826.0.1.3680043.8.498.1.1.1"], address="127.0.0.1",
                 detail="WADO-RS instance")
    audit.record(gateway.index, audit.Action.LINK_REFUSE, outcome=audit.Outcome.MINOR_FAILURE,
                 actor="unknown", address="10.0.0.9", patient_id="PAT-001", detail="expired")
    events = audit.events_for_patient(gateway.index, "PAT-001")
    assert [e.action for e in events] == ["link.refuse", "retrieve"]
    retrieve = events[1]
    assert retrieve.patient_id == "PAT-001" and retrieve.jti == "j-123"
    assert retrieve.actor == "viewer_session:dr-1" and retrieve.actor_relationship == "trust_circle"

    bundle = audit.fhir_bundle(events)
    assert bundle["resourceType"] == "Bundle" and bundle["total"] == 2
    resource = bundle["entry"][1]["resource"]
    assert resource["resourceType"] == "AuditEvent"
    assert resource["type"]["code"] == "110103" and resource["action"] == "R"
    assert resource["outcome"] == "0" and resource["recorded"].endswith("Z")
    assert resource["agent"][0]["role"] == [{"text": "trust_circle"}]
    assert resource["agent"][0]["network"] == {"address": "127.0.0.1", "type": "2"}
    whats = [e["what"]["identifier"]["value"] for e in resource["entity"]]
    assert whats == ["PAT-001", "urn:oid:1.2.826.0.1.3680043.8.498.1", "j-123"]
    assert bundle["entry"][0]["resource"]["outcome"] == "4"

    message = ET.fromstring(audit.dicom_audit_message(retrieve))
    event_id = message.find("EventIdentification/EventID")
    assert event_id is not None and event_id.get("csd-code") == "110103"
    objects = {o.get("ParticipantObjectTypeCodeRole"): o.get("ParticipantObjectID")
               for o in message.iter("ParticipantObjectIdentification")}
    assert objects == {"3": "1.2.826.0.1.3680043.8.498.1", "1": "PAT-001"}
    assert "Müller" not in audit.dicom_audit_message(retrieve)


@pytest.mark.parametrize("statement", [
    update(AuditRecord).values(outcome=0), delete(AuditRecord),
])
def test_trail_is_append_only(gateway: Gateway, statement: object) -> None:
    audit.record(gateway.index, audit.Action.QUERY, actor="api_key:x", patient_id="P")
    with pytest.raises(DatabaseError, match="append-only"):
        gateway.index.write(lambda session: session.execute(statement))
    assert len(audit.events_for_patient(gateway.index, "P")) == 1
