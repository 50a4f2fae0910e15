"""Key images of a study, as its key-image Key Object Selection documents name them.

A Key Object Selection (KOS) document (PS3.3 A.35.4, template TID 2010) lists the instances it
selects in its evidence and as IMAGE content items (:func:`gateway.iocm.references`). Only KOS
documents whose title selects *key images* (:data:`gateway.iocm.KEY_IMAGE_TITLES`, e.g. 113000
"Of Interest") count: a manifest, a frame group or a rejection note is no key-image selection
(IHE IOCM; PS3.16 CID 7010). Read from the DICOM JSON stored at ingest
(``Instance.metadata_json``), so no file is opened. Only instances stored in the study (and so
not rejected: :mod:`gateway.rejection`) are returned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.iocm import KEY_OBJECT_SELECTION, Purpose, purpose, referenced_instances
from gateway.models import Instance, Series, Study


@dataclass(frozen=True)
class KeyImage:
    series_instance_uid: str
    sop_instance_uid: str


def key_images(session: Session, study_instance_uid: str) -> list[KeyImage]:
    """The key images of a study, in series then instance order; empty if it has none.

    Parameters
    ----------
    session
        An index session.
    study_instance_uid
        A validated Study Instance UID.
    """
    in_study = (
        select(Instance.pk).join(Series, Instance.series_pk == Series.pk)
        .join(Study, Series.study_pk == Study.pk)
        .where(Study.study_instance_uid == study_instance_uid)
    )
    wanted: set[str] = set()
    for text in session.scalars(
        select(Instance.metadata_json).where(Instance.pk.in_(in_study),
                                             Instance.sop_class_uid == KEY_OBJECT_SELECTION)
    ):
        metadata = json.loads(text)
        if purpose(metadata) is Purpose.KEY_IMAGES:
            wanted.update(referenced_instances(metadata))
    if not wanted:
        return []
    found = session.execute(
        select(Instance.sop_instance_uid, Instance.instance_number, Series.series_instance_uid,
               Series.series_number)
        .join(Series, Instance.series_pk == Series.pk)
        .where(Instance.pk.in_(in_study), Instance.sop_instance_uid.in_(sorted(wanted)))
    ).all()
    found = sorted(found, key=lambda r: (r.series_number or 0, r.series_instance_uid,
                                          r.instance_number or 0, r.sop_instance_uid))
    return [KeyImage(r.series_instance_uid, r.sop_instance_uid) for r in found]


__all__ = ["KEY_OBJECT_SELECTION", "KeyImage", "key_images", "referenced_instances"]
