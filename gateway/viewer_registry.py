"""The database side of viewer links: the link registry, viewer sessions, and the facts the DSP
rules are applied to (a study's confidentiality, its date, its patient's DSP creation date, its
key images).

Transport-free: ``viewer_links`` keeps the tokens (signing, verifying), the decisions about
links and the web, and reaches the index only through this module (DESIGN.md, "Layout": the
front ends import ``gateway``, and the SQL stays in the core). A unit of work that must decide
and write in one transaction (opening a link: lock its registry row, check it, count the use,
open the session, record the trail) is a function of a :class:`RegistryUnit`, run by
:meth:`ViewerRegistry.write` in one group-committed transaction (``Index.write``).

Records handed out are frozen copies (:class:`LinkRecord`, :class:`SessionRecord`,
:class:`StudyFacts`), never ORM rows, so nothing outside the core holds a database session.
Tokens are never stored: links are known by their ``jti``, sessions by the SHA-256 of their id.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from gateway import audit
from gateway.index import Index
from gateway.keyimages import KeyImage, key_images
from gateway.models import LinkRevocation, Patient, Study, ViewerLink, ViewerSession
from gateway.patients import dsp_created, set_dsp_created

T = TypeVar("T")


def aware(moment: datetime) -> datetime:
    """A stored time as an aware UTC datetime (SQLite gives naive ones back)."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class LinkRecord:
    """One registered link (a row of ``viewer_link``): who it is for, its limits, its state."""

    jti: str
    kid: str
    study_instance_uid: str
    viewer_id: str
    viewer_name: str
    viewer_relationship: str
    key_images_only: bool
    max_uses: int | None
    uses: int
    issued_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    minted_by: str
    credential: str | None = None  # an IID launch's bearer credential (Principal.credential)

    @classmethod
    def of(cls, row: ViewerLink) -> LinkRecord:
        return cls(row.jti, row.kid, row.study_instance_uid, row.viewer_id, row.viewer_name,
                   row.viewer_relationship, bool(row.key_images_only), row.max_uses, row.uses,
                   aware(row.issued_at), aware(row.expires_at),
                   aware(row.revoked_at) if row.revoked_at else None, row.minted_by,
                   row.credential)


@dataclass(frozen=True)
class SessionRecord:
    """One viewer session (a row of ``viewer_session``); ``instance_uids`` ``None``: whole study."""

    id_hash: str
    jti: str
    study_instance_uid: str
    instance_uids: frozenset[str] | None
    address: str
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class StudyFacts:
    """What the DSP rules (``gateway.confidentiality.decide``) need to know of a study, now."""

    study_instance_uid: str
    study_date: str
    confidentiality: str
    author: str | None
    patient_id: str
    dsp_created: str | None


# -- the lookups the DSP rules depend on: one function each -------------------------------------
def patient_dsp_created(session: Session, patient_id: str, issuer: str) -> str | None:
    """The DSP creation date of a patient identity (:func:`gateway.patients.dsp_created`)."""
    return dsp_created(session, patient_id, issuer)


def study_facts(session: Session, study_uid: str) -> StudyFacts | None:
    """A study's date, confidentiality level, author and its patient's DSP creation date."""
    row = session.execute(
        select(Study.study_date, Study.confidentiality, Study.author, Patient.patient_id,
               Patient.issuer_of_patient_id)
        .join(Patient, Study.patient_pk == Patient.pk)
        .where(Study.study_instance_uid == study_uid)
    ).one_or_none()
    if row is None:
        return None
    return StudyFacts(study_uid, row.study_date, row.confidentiality, row.author,
                      str(row.patient_id),
                      patient_dsp_created(session, row.patient_id, row.issuer_of_patient_id))


def study_key_images(session: Session, study_uid: str) -> list[KeyImage]:
    """The key images a viewer link on ``study_uid`` may show (``gateway.keyimages``)."""
    return key_images(session, study_uid)


class RegistryUnit:
    """One unit of work on the registry, inside a transaction run by :class:`ViewerRegistry`.

    Parameters
    ----------
    session
        The running transaction's session; everything done here commits or rolls back with it.
    """

    def __init__(self, session: Session) -> None:
        self._session = session

    # -- reads -----------------------------------------------------------------------------------
    def study(self, study_uid: str) -> StudyFacts | None:
        """The study's facts for the DSP rules (:func:`study_facts`), or ``None`` if absent."""
        return study_facts(self._session, study_uid)

    def study_exists(self, study_uid: str) -> bool:
        return self._session.scalar(
            select(Study.pk).where(Study.study_instance_uid == study_uid)) is not None

    def key_images(self, study_uid: str) -> list[KeyImage]:
        """The study's key images (:func:`study_key_images`)."""
        return study_key_images(self._session, study_uid)

    def link(self, jti: str, *, for_update: bool = False) -> LinkRecord | None:
        """The registered link ``jti``; ``for_update`` locks its row until the unit ends."""
        query = select(ViewerLink).where(ViewerLink.jti == jti)
        if for_update:
            query = query.with_for_update()
        row = self._session.scalars(query).one_or_none()
        return LinkRecord.of(row) if row is not None else None

    def revocation(self, jti: str) -> datetime | None:
        """When ``jti`` was revoked (registered as a link or not), or ``None``."""
        found = self._session.scalar(select(LinkRevocation.revoked_at)
                                     .where(LinkRevocation.jti == jti))
        return aware(found) if found is not None else None

    def live_session(self, id_hash: str) -> tuple[SessionRecord, LinkRecord] | None:
        """The session with this id hash and its link, whatever their state; ``None`` if unknown.

        The link's ``revoked_at`` is its own or that of a revocation of its ``jti``, whichever
        was recorded (a revocation may have been committed while the link was first opened).
        """
        row = self._session.execute(
            select(ViewerSession, ViewerLink, LinkRevocation.revoked_at)
            .join(ViewerLink, ViewerSession.jti == ViewerLink.jti)
            .outerjoin(LinkRevocation, LinkRevocation.jti == ViewerLink.jti)
            .where(ViewerSession.id_hash == id_hash)
        ).one_or_none()
        if row is None:
            return None
        found, link, revoked = row
        record = LinkRecord.of(link)
        if record.revoked_at is None and revoked is not None:
            record = replace(record, revoked_at=aware(revoked))
        instances = (frozenset(json.loads(found.instance_uids))
                     if found.instance_uids is not None else None)
        return (SessionRecord(found.id_hash, found.jti, found.study_instance_uid, instances,
                              found.address, aware(found.created_at), aware(found.expires_at)),
                record)

    # -- writes ----------------------------------------------------------------------------------
    def add_link(self, link: LinkRecord) -> None:
        """Register a link (written at the end of the unit, or at the next read)."""
        self._session.add(ViewerLink(
            jti=link.jti, kid=link.kid, study_instance_uid=link.study_instance_uid,
            viewer_id=link.viewer_id, viewer_name=link.viewer_name,
            viewer_relationship=link.viewer_relationship, key_images_only=link.key_images_only,
            max_uses=link.max_uses, uses=link.uses, issued_at=link.issued_at,
            expires_at=link.expires_at, revoked_at=link.revoked_at, minted_by=link.minted_by,
            credential=link.credential,
        ))
        self._session.flush()

    def count_use(self, jti: str) -> int:
        """Add one to the link's use count; return the new count."""
        row = self._session.get(ViewerLink, jti)
        assert row is not None, "count_use on an unregistered link"
        row.uses += 1
        return row.uses

    def revoke(self, jti: str, at: datetime, *, by: str) -> LinkRecord | None:
        """Revoke ``jti`` for good, registered or not; return its link, if registered.

        The revocation is kept (an earlier one keeps its time); a registered link is marked
        revoked and its sessions end.
        """
        if self._session.get(LinkRevocation, jti) is None:
            self._session.add(LinkRevocation(jti=jti, revoked_at=at, revoked_by=by[:200]))
        row = self._session.get(ViewerLink, jti)
        if row is None:
            return None
        if row.revoked_at is None:
            row.revoked_at = at
        self._session.execute(delete(ViewerSession).where(ViewerSession.jti == jti))
        return LinkRecord.of(row)

    def open_session(self, id_hash: str, jti: str, study_uid: str,
                     instance_uids: Iterable[str] | None, *, address: str,
                     created_at: datetime, expires_at: datetime) -> None:
        """Create a viewer session of link ``jti``, dropping every session already expired.

        ``instance_uids`` ``None`` opens the whole study; a list limits it to those instances.
        """
        self._session.execute(delete(ViewerSession).where(ViewerSession.expires_at < created_at))
        self._session.add(ViewerSession(
            id_hash=id_hash, jti=jti, study_instance_uid=study_uid,
            instance_uids=json.dumps(list(instance_uids)) if instance_uids is not None else None,
            address=address[:64], created_at=created_at, expires_at=expires_at,
        ))

    def audit(self, action: audit.Action | str, **fields: Any) -> None:
        """Append a trail entry in this unit (:func:`gateway.audit.add`)."""
        audit.add(self._session, action, **fields)


class ViewerRegistry:
    """The link registry and viewer sessions of one index.

    Parameters
    ----------
    index
        The index database (SQLite or PostgreSQL); its group-committed writer runs the units.
    """

    def __init__(self, index: Index) -> None:
        self.index = index

    def write(self, work: Callable[[RegistryUnit], T]) -> T:
        """Run ``work`` in one committed transaction (``Index.write``); return what it returns."""
        return self.index.write(lambda session: work(RegistryUnit(session)))

    def read(self, work: Callable[[RegistryUnit], T]) -> T:
        """Run ``work`` in a read-only session (nothing it adds is committed)."""
        with self.index.Session() as session:
            return work(RegistryUnit(session))

    def links(self, *, study: str | None = None, active: bool = False) -> list[LinkRecord]:
        """The registered links, newest first; ``active``: neither revoked nor expired."""
        with self.index.Session() as session:
            query = select(ViewerLink).order_by(ViewerLink.issued_at.desc())
            if study:
                query = query.where(ViewerLink.study_instance_uid == study)
            if active:
                query = query.where(ViewerLink.revoked_at.is_(None),
                                    ViewerLink.expires_at > datetime.now(UTC))
            return [LinkRecord.of(row) for row in session.scalars(query)]

    def dsp_created(self, patient_id: str, issuer: str = "") -> str | None:
        """The DSP creation date recorded for a patient identity, or ``None``."""
        with self.index.Session() as session:
            return dsp_created(session, patient_id, issuer)

    def set_confidentiality(self, study_uid: str, level: str, *, author: str | None,
                            keep_author: bool, actor: str, address: str = "") -> bool:
        """Set a study's level (and author unless ``keep_author``), recorded in the trail.

        Returns ``False`` when the study is not in the archive (nothing written).
        """
        values: dict[str, Any] = {"confidentiality": level}
        if not keep_author:
            values["author"] = author

        def work(session: Session) -> bool:
            result = session.execute(update(Study).where(Study.study_instance_uid == study_uid)
                                     .values(**values))
            if not result.rowcount:  # type: ignore[attr-defined]
                return False
            audit.add(session, audit.Action.POLICY_CHANGE, actor=actor, study_uid=study_uid,
                      address=address,
                      detail=f"confidentiality set to {level}"
                             + ("" if keep_author else f", author {author or 'none'}"))
            return True

        return self.index.write(work)

    def set_dsp_created(self, patient_id: str, date: str, *, actor: str, address: str = "",
                        issuer: str = "") -> None:
        """Record (or move) the DSP creation date (``YYYYMMDD``) of a patient identity,
        whether or not a study of it is stored (:func:`gateway.patients.set_dsp_created`), and
        put it in the trail."""

        def work(session: Session) -> None:
            set_dsp_created(session, patient_id, issuer, date)
            audit.add(session, audit.Action.POLICY_CHANGE, actor=actor, patient_id=patient_id,
                      address=address, detail=f"DSP creation date set to {date}"
                      + (f" (issuer {issuer})" if issuer else ""))

        self.index.write(work)


__all__ = ["LinkRecord", "RegistryUnit", "SessionRecord", "StudyFacts", "ViewerRegistry",
           "aware", "patient_dsp_created", "study_facts", "study_key_images"]
