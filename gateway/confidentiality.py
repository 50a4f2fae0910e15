"""The DSP's confidentiality rules as one pure function: who may open a study through a link.

Luxembourg's shared health record (DSP, "Dossier de Soins Partagé") lets a document be made
confidential at two levels (DESIGN.md, "Confidentiality levels"):

- ``normal``: every relationship a portal may state;
- ``confidential`` ("Confidentiel"): the patient, the legal representative, the patient's DSP
  assistant, the referring physician, and professionals in the trust circle ("Cercle Médical de
  Confiance");
- ``private`` ("Privé"): the patient and the document's author only.

Studies acquired before the patient's DSP was created are not reachable through DSP links ("the
DSP holds no history of images made before the DSP was created").

This module knows nothing of HTTP, tokens or the database: :func:`decide` takes plain values and
answers a :class:`Decision`; the links front end calls it when a link is made and again on every
request of the session it opened, so a change of level takes effect at once. Deny by default: an
unknown relationship or level, an unknown DSP creation date or study date, or a private study
without a recorded author is refused.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class Relationship(enum.StrEnum):
    """The viewer's relationship to the patient, as stated by the portal."""

    PATIENT = "patient"
    LEGAL_REPRESENTATIVE = "legal_representative"
    DSP_ASSISTANT = "dsp_assistant"
    REFERRING_PHYSICIAN = "referring_physician"
    TRUST_CIRCLE = "trust_circle"
    PRESENCE_CODE = "presence_code"
    CARE_STAY = "care_stay"
    AUTHOR = "author"


class Level(enum.StrEnum):
    """A study's confidentiality level (``PUT /api/studies/{uid}/confidentiality``)."""

    NORMAL = "normal"
    CONFIDENTIAL = "confidential"
    PRIVATE = "private"


ALLOWED: dict[Level, frozenset[Relationship]] = {
    Level.NORMAL: frozenset(Relationship),
    Level.CONFIDENTIAL: frozenset({
        Relationship.PATIENT, Relationship.LEGAL_REPRESENTATIVE, Relationship.DSP_ASSISTANT,
        Relationship.REFERRING_PHYSICIAN, Relationship.TRUST_CIRCLE,
    }),
    Level.PRIVATE: frozenset({Relationship.PATIENT, Relationship.AUTHOR}),
}


class Reason(enum.StrEnum):
    """Why a link is refused by the rules (machine-readable; pages and problems explain it)."""

    UNKNOWN_RELATIONSHIP = "unknown_relationship"
    UNKNOWN_LEVEL = "unknown_level"
    NO_DSP = "no_dsp"  # the patient's DSP creation date is not recorded
    NO_STUDY_DATE = "no_study_date"
    BEFORE_DSP = "before_dsp"
    LEVEL = "confidentiality"  # the level does not admit this relationship
    NOT_AUTHOR = "not_author"  # private study: the viewer is not its recorded author


@dataclass(frozen=True)
class Decision:
    """The answer of :func:`decide`: allowed, or refused with a reason and an explanation."""

    allowed: bool
    reason: Reason | None = None
    detail: str = ""

    def __bool__(self) -> bool:
        return self.allowed


ALLOW = Decision(True)
_DATE = re.compile(r"^\d{8}$")


def normalise_date(value: str) -> str:
    """Return ``YYYYMMDD`` from ``YYYYMMDD`` or ``YYYY-MM-DD``; raise ValueError otherwise.

    >>> normalise_date("2024-03-15")
    '20240315'
    """
    text = value.replace("-", "") if len(value) == 10 and value[4] == value[7] == "-" else value
    if not _DATE.match(text):
        raise ValueError(f"{value!r} is not a date (YYYY-MM-DD)")
    month, day = int(text[4:6]), int(text[6:8])
    if not (1 <= month <= 12 and 1 <= day <= 31):
        raise ValueError(f"{value!r} is not a date (YYYY-MM-DD)")
    return text


def decide(relationship: str, level: str, *, study_date: str, dsp_created: str | None,
           viewer_id: str, author: str | None) -> Decision:
    """May a viewer with this relationship open a study through a DSP link?

    Parameters
    ----------
    relationship
        The viewer's relationship to the patient (:class:`Relationship` value).
    level
        The study's confidentiality level (:class:`Level` value).
    study_date
        The study's StudyDate (DA, ``YYYYMMDD``; PS3.5 Table 6.2-1); empty when unknown.
    dsp_created
        The patient's DSP creation date, ``YYYYMMDD``, or ``None`` when not recorded.
    viewer_id
        The viewer's identifier as the portal states it.
    author
        The identifier of the study's author (the professional who issued it), if recorded.

    Returns
    -------
    Decision

    Examples
    --------
    >>> decide("care_stay", "confidential", study_date="20240315", dsp_created="20200101",
    ...        viewer_id="dr-x", author=None).reason
    <Reason.LEVEL: 'confidentiality'>
    >>> bool(decide("author", "private", study_date="20240315", dsp_created="20200101",
    ...             viewer_id="dr-x", author="dr-x"))
    True
    """
    try:
        rel = Relationship(relationship)
    except ValueError:
        return Decision(False, Reason.UNKNOWN_RELATIONSHIP,
                        f"relationship {relationship!r} is not one of "
                        f"{', '.join(r.value for r in Relationship)}")
    try:
        lvl = Level(level)
    except ValueError:
        return Decision(False, Reason.UNKNOWN_LEVEL, f"confidentiality level {level!r} is unknown")
    if not dsp_created:
        return Decision(False, Reason.NO_DSP,
                        "the patient's DSP creation date is not recorded; studies are reachable "
                        "through DSP links only once it is (PUT /api/patients/{id}/dsp)")
    if not study_date or not _DATE.match(study_date):
        return Decision(False, Reason.NO_STUDY_DATE,
                        "the study has no StudyDate, so it cannot be shown to postdate the DSP")
    if study_date < dsp_created:
        return Decision(False, Reason.BEFORE_DSP,
                        f"the study ({study_date}) predates the patient's DSP ({dsp_created})")
    if rel not in ALLOWED[lvl]:
        return Decision(False, Reason.LEVEL,
                        f"a {lvl.value} study is not visible to the relationship {rel.value}")
    if lvl is Level.PRIVATE and rel is Relationship.AUTHOR and (not author or author != viewer_id):
        return Decision(False, Reason.NOT_AUTHOR,
                        "a private study is visible to its author only, and this viewer is not "
                        "the recorded author")
    return ALLOW


__all__ = ["ALLOWED", "Decision", "Level", "Reason", "Relationship", "decide", "normalise_date"]
