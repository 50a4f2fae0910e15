"""Replacing an instance ([storage] overwrite) keeps what the portal set on its study and patient.

The replaced instance may be the last of its study: its rows are dropped and made again, and a
new study row is ``normal``. A ``private`` study must stay private (DSP rules, issue 5).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from gateway.core import Gateway
from gateway.ingest import Outcome
from gateway.models import Study
from gateway.patients import dsp_created, set_dsp_created
from tests.support.common import ct_dataset, make_settings, part10


def test_replacing_the_only_instance_keeps_confidentiality_and_dsp_date(
        tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url, GATEWAY_STORAGE_OVERWRITE="true")
    with Gateway(settings) as gateway:
        original = ct_dataset(0)
        gateway.ingestor.ingest(part10(original), source="test")

        def set_policy(session: Session) -> None:
            session.execute(update(Study).values(confidentiality="private", author="dr-a"))
            set_dsp_created(session, original.PatientID, "", "20200101")

        gateway.index.write(set_policy)
        changed = ct_dataset(0)
        changed.StudyDescription = "corrected"
        result = gateway.ingestor.ingest(part10(changed), source="test")
        assert result.outcome is Outcome.REPLACED
        with gateway.index.Session() as session:
            study = session.execute(
                select(Study.confidentiality, Study.author, Study.study_description)).one()
            assert tuple(study) == ("private", "dr-a", "corrected")
            assert dsp_created(session, original.PatientID) == "20200101"
