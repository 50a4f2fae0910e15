"""Oracle for the hand-built FHIR AuditEvent export (:func:`gateway.audit.fhir_audit_event`,
:func:`gateway.audit.fhir_bundle`): every resource of many seeded random trail entries is valid
for the FHIR models of ``fhir.resources`` and says, value for value, what the model reads from
it. The package's R4B models are used (FHIR 4.3.0, whose AuditEvent and Bundle are R4's
unchanged; its pure-R4 releases need pydantic 1)."""

from __future__ import annotations

import json
import random
import string
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle

from gateway import audit
from gateway.models import AuditRecord

CASES = 400
TEXT = string.ascii_letters + string.digits + " .:-_/@'\"<>&éßЖ山"


def maybe_text(rng: random.Random, size: int, empty: str | None = "") -> str | None:
    if rng.random() < 0.3:
        return empty
    return "".join(rng.choice(TEXT) for _ in range(rng.randint(1, size))).strip() or "x"


def uid(rng: random.Random) -> str:
    return "1.2." + ".".join(str(rng.randint(0, 99999)) for _ in range(rng.randint(1, 8)))


def entry(rng: random.Random, pk: int) -> AuditRecord:
    zone = rng.choice([UTC, timezone(timedelta(hours=1)), timezone(timedelta(hours=-5)), None])
    moment = datetime(2020, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randint(0, 10 ** 8),
                                                          microseconds=rng.randint(0, 999999))
    instances = [uid(rng) for _ in range(rng.randint(0, 5))]
    return AuditRecord(
        pk=pk,
        recorded_at=moment.replace(tzinfo=None) if zone is None else moment.astimezone(zone),
        action=rng.choice(list(audit.Action)).value,
        outcome=int(rng.choice(list(audit.Outcome))),
        actor=maybe_text(rng, 40),
        actor_name=maybe_text(rng, 40),
        actor_relationship=maybe_text(rng, 20, None),
        address=rng.choice(["", "127.0.0.1", "::1", "10.1.2.3"]),
        patient_id=maybe_text(rng, 16, rng.choice([None, ""])),
        study_instance_uid=uid(rng) if rng.random() < 0.8 else None,
        instance_uids=json.dumps(instances) if instances or rng.random() < 0.5 else None,
        jti=maybe_text(rng, 32, None),
        detail=maybe_text(rng, 120) or "",
    )


def model_json(model: Any) -> dict[str, Any]:
    read: dict[str, Any] = json.loads(model.model_dump_json(exclude_none=True))
    return read


def test_each_audit_event_is_a_valid_r4_audit_event() -> None:
    for seed in range(CASES):
        rng = random.Random(seed)
        record = entry(rng, seed + 1)
        resource = audit.fhir_audit_event(record)
        model = AuditEvent.model_validate(resource)
        assert model_json(model) == resource, seed
        assert resource["outcome"] in {"0", "4", "8", "12"}  # R4's audit-event-outcome codes
        assert resource["action"] in {"C", "R", "U", "D", "E"}  # and audit-event-action


def test_the_bundle_is_a_valid_r4_searchset() -> None:
    rng = random.Random(7)
    records = [entry(rng, pk) for pk in range(1, 40)]
    for base_url in ("", "https://gateway.example"):
        bundle = audit.fhir_bundle(records, base_url)
        assert model_json(Bundle.model_validate(bundle)) == bundle
        assert bundle["total"] == len(records)
