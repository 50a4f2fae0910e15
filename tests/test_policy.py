"""The DSP rule matrix: relationship x confidentiality level x DSP creation date.

Checked twice: on the pure function (gateway.confidentiality.decide), and over real HTTP both
when a link is minted (POST /api/links) and when a link is used (GET /view/<portal-signed link>).
The expected table below is written out by hand from DSP.md, not computed from the code.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.confidentiality import Reason, decide, normalise_date
from tests.support.links_helpers import (
    links_env,
    portal_token,
    small_study,
)

RELATIONSHIPS = ["patient", "legal_representative", "dsp_assistant", "referring_physician",
                 "trust_circle", "presence_code", "care_stay", "author"]
# Who sees what, from DSP.md: "Confidentiel" = patient (and/or legal representative), DSP
# assistant, referring physician, trust circle; "Privé" = patient and the author only.
EXPECTED = {
    #                        normal confidential private
    "patient":              (True, True, True),
    "legal_representative": (True, True, False),
    "dsp_assistant":        (True, True, False),
    "referring_physician":  (True, True, False),
    "trust_circle":         (True, True, False),
    "presence_code":        (True, False, False),
    "care_stay":            (True, False, False),
    "author":               (True, False, True),
}
LEVELS = ["normal", "confidential", "private"]
STUDY_DATE = "20240315"
# DSP creation date relative to the study: None = not recorded.
DSP_DATES = {"before_study": "20200101", "same_day": "20240315", "after_study": "20240316",
             "unknown": None}
AUTHOR = "dr-author"


def expected(relationship: str, level: str, dsp: str) -> bool:
    if DSP_DATES[dsp] is None or dsp == "after_study":
        return False  # no DSP recorded, or the study predates the DSP
    return EXPECTED[relationship][LEVELS.index(level)]


@pytest.mark.parametrize("dsp", sorted(DSP_DATES))
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("relationship", RELATIONSHIPS)
def test_matrix_pure(relationship: str, level: str, dsp: str) -> None:
    decision = decide(relationship, level, study_date=STUDY_DATE, dsp_created=DSP_DATES[dsp],
                      viewer_id=AUTHOR if relationship == "author" else "someone",
                      author=AUTHOR)
    assert bool(decision) is expected(relationship, level, dsp)
    if not decision:
        assert decision.reason is not None and decision.detail
        if DSP_DATES[dsp] is None:
            assert decision.reason is Reason.NO_DSP
        elif dsp == "after_study":
            assert decision.reason is Reason.BEFORE_DSP


@pytest.mark.parametrize("viewer,author,allowed", [
    (AUTHOR, AUTHOR, True), ("dr-other", AUTHOR, False), (AUTHOR, None, False),
])
def test_private_author_must_be_the_recorded_author(viewer: str, author: str | None,
                                                    allowed: bool) -> None:
    decision = decide("author", "private", study_date=STUDY_DATE, dsp_created="20200101",
                      viewer_id=viewer, author=author)
    assert bool(decision) is allowed
    if not allowed:
        assert decision.reason is Reason.NOT_AUTHOR


@pytest.mark.parametrize("relationship,level,study_date,reason", [
    ("neighbour", "normal", STUDY_DATE, Reason.UNKNOWN_RELATIONSHIP),
    ("patient", "secret", STUDY_DATE, Reason.UNKNOWN_LEVEL),
    ("patient", "normal", "", Reason.NO_STUDY_DATE),
    ("patient", "normal", "2024", Reason.NO_STUDY_DATE),
])
def test_deny_by_default(relationship: str, level: str, study_date: str,
                         reason: Reason) -> None:
    decision = decide(relationship, level, study_date=study_date, dsp_created="20200101",
                      viewer_id="x", author=None)
    assert not decision and decision.reason is reason


@pytest.mark.parametrize("text,value", [("2024-03-15", "20240315"), ("20240315", "20240315")])
def test_normalise_date(text: str, value: str) -> None:
    assert normalise_date(text) == value


@pytest.mark.parametrize("text", ["2024-3-15", "15.03.2024", "2024-13-01", "", "2024-02-32"])
def test_normalise_date_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a date"):
        normalise_date(text)


# -- the same matrix over HTTP, at mint time and at use time ------------------------------------
@pytest.fixture
def portal_env(tmp_path: Path, database_url: str) -> Iterator[dict[str, Any]]:
    study = small_study("LU0000001", "ACC1", study_date=STUDY_DATE)
    with links_env(tmp_path, database_url, studies={"study": study}) as env:
        yield env


def test_matrix_over_http(portal_env: dict[str, Any]) -> None:
    portal, browser, study = portal_env["portal"], portal_env["browser"], portal_env["study"]
    checked = 0
    for dsp in ("unknown", "before_study", "same_day", "after_study"):
        if DSP_DATES[dsp] is not None:
            date = DSP_DATES[dsp]
            assert portal.request("PUT", "/api/patients/LU0000001/dsp",
                                  {"created": f"{date[:4]}-{date[4:6]}-{date[6:]}"}).status == 200
        for level in LEVELS:
            assert portal.request("PUT", f"/api/studies/{study}/confidentiality",
                                  {"level": level, "author": AUTHOR}).status == 200
            for relationship in RELATIONSHIPS:
                viewer = AUTHOR if relationship == "author" else f"v-{relationship}"
                allowed = expected(relationship, level, dsp)
                case = f"{relationship} x {level} x DSP {dsp}"
                minted = portal.request("POST", "/api/links", {
                    "study": study, "viewer": {"id": viewer, "name": viewer},
                    "relationship": relationship})
                assert minted.status == (201 if allowed else 403), (case, minted.text)
                if not allowed:
                    assert minted.json()["reason"] in {r.value for r in Reason}, case
                token = portal_token(study, rel=relationship, sub=viewer)
                used = browser.request("GET", f"/view/{token}")
                assert used.status == (303 if allowed else 403), (case, used.text[:200])
                if not allowed:
                    assert '<code id="reason">policy</code>' in used.text
                checked += 1
    assert checked == len(RELATIONSHIPS) * len(LEVELS) * len(DSP_DATES)
