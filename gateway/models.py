"""SQLAlchemy 2 typed models of the index: patient / study / series / instance.

The columns are the attributes QIDO-RS and C-FIND match on (PS3.18 Tables 10.6.3-3/4/5, PS3.4
C.6), indexed; the study's counts and ModalitiesInStudy are kept current at ingest. Each instance
keeps its DICOM JSON metadata (PS3.18 F.2), computed once at ingest, with bulk data as
``BulkDataURI`` relative to the DICOMweb root (``studies/.../bulk/...``); the web front end makes
them absolute when it serves them.

Person names are also kept normalised (upper case, accents removed) for fuzzy matching.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patient"
    __table_args__ = (
        UniqueConstraint("patient_id", "issuer_of_patient_id"),
        # Bytewise on PostgreSQL, so that it serves LIKE 'PREFIX%' (migration 0008).
        Index("ix_patient_patient_name_norm", "patient_name_norm",
              postgresql_ops={"patient_name_norm": "varchar_pattern_ops"}),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    patient_name_norm: Mapped[str] = mapped_column(String(324), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "study"
    __table_args__ = (
        Index("ix_study_date_time", "study_date", "study_time"),
        Index("ix_study_patient_date", "patient_pk", "study_date"),
        Index("ix_study_referring_physician_name_norm", "referring_physician_name_norm",
              postgresql_ops={"referring_physician_name_norm": "varchar_pattern_ops"}),
        Index("ix_study_study_id", "study_id"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.pk", ondelete="CASCADE"))
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    study_id: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    referring_physician_name: Mapped[str] = mapped_column(String(324), default="")
    referring_physician_name_norm: Mapped[str] = mapped_column(String(324), default="")
    timezone_offset: Mapped[str] = mapped_column(String(5), default="")
    # Backslash-separated, sorted, e.g. "CT\SR".
    modalities_in_study: Mapped[str] = mapped_column(String(256), default="")
    # DSP confidentiality level: normal | confidential | private; author for "private".
    confidentiality: Mapped[str] = mapped_column(String(16), default="normal")
    author: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # Study and patient level attributes (DICOM JSON) of the first instance received.
    attributes: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # When the row last changed (a series added or removed); not touched by each instance.
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"
    __table_args__ = (
        Index("ix_series_study_modality", "study_pk", "modality"),
        Index("ix_series_study_number", "study_pk", "series_number"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Indexed by ix_series_study_modality, which starts with it.
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.pk", ondelete="CASCADE"))
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(64), default="")
    body_part_examined: Mapped[str] = mapped_column(String(16), default="")
    performed_procedure_step_start_date: Mapped[str] = mapped_column(String(8), default="")
    performed_procedure_step_start_time: Mapped[str] = mapped_column(String(16), default="")
    series_date: Mapped[str] = mapped_column(String(8), default="")
    series_time: Mapped[str] = mapped_column(String(16), default="")
    # Series level attributes (DICOM JSON) of the first instance received.
    attributes: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"
    __table_args__ = (Index("ix_instance_series_number", "series_pk", "instance_number"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Indexed by ix_instance_series_number, which starts with it.
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.pk", ondelete="CASCADE"))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bits_allocated: Mapped[int | None] = mapped_column(Integer, nullable=True)
    number_of_frames: Mapped[int | None] = mapped_column(Integer, nullable=True)
    file_path: Mapped[str] = mapped_column(String(512), unique=True)
    file_size: Mapped[int] = mapped_column(BigInteger)
    # SHA-256 of the data set (file meta excluded): identical re-sends are recognised by it.
    digest: Mapped[str] = mapped_column(String(64))
    # DICOM JSON of the whole instance, bulk data as relative BulkDataURI.
    metadata_json: Mapped[str] = mapped_column(Text)
    # Where it came from: "dimse:<calling AE>@<address>", "stow:<principal>", "cli".
    source: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    series: Mapped[Series] = relationship(back_populates="instances")


class DspPatient(Base):
    """When a patient's shared record (DSP) was created: a fact about a patient identity.

    Kept apart from :class:`Patient` (whose rows come and go with the studies stored), so that
    the portal may record it before any image arrives (``PUT /api/patients/{id}/dsp``). An
    empty issuer stands for "any issuer": a study's patient ``(id, issuer)`` takes the row of
    its own issuer if there is one, else the row of ``(id, "")`` (:mod:`gateway.patients`).
    """

    __tablename__ = "dsp_patient"

    patient_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), primary_key=True, default="")
    # "YYYYMMDD": studies acquired before it are not reachable through DSP links.
    dsp_created: Mapped[str] = mapped_column(String(8))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RejectedInstance(Base):
    """An instance an IHE IOCM rejection note took out of the archive, or the note itself.

    Its ``instance`` row is gone (so no query, retrieval, count or viewer session can reach
    it); this row remembers it so that a later re-send is refused, and keeps the file's path
    unless the rejection deleted the file ("Data Retention Policy Expired") or the instance was
    never stored (a note may name instances before they arrive). :mod:`gateway.rejection`.
    """

    __tablename__ = "rejected_instance"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    # The rejection's title, PS3.16 CID 7011 code value (e.g. "113001").
    code: Mapped[str] = mapped_column(String(16))
    # The SOP Instance UID of the rejection note (its own for the note's row).
    note_uid: Mapped[str] = mapped_column(String(64), index=True)
    file_path: Mapped[str | None] = mapped_column(String(512), nullable=True)
    digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    rejected_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiKey(Base):
    """A static API key (``Authorization: Bearer dgw_<key_id>_<secret>``), stored hashed.

    Only the SHA-256 of the secret is kept: keys are 256-bit random values, so a fast hash is
    as safe as a slow one and keeps per-request checks cheap. The key is shown once, at creation.
    """

    __tablename__ = "api_key"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    # Space-separated scopes, e.g. "dicomweb:read dicomweb:write".
    scopes: Mapped[str] = mapped_column(String(512), default="")
    institution: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


# -- viewer links, viewer sessions and the access trail (migration 0002_links) ------------------
class ViewerLink(Base):
    """The registry of viewer links by ``jti``: use counts and revocation.

    Links minted by the gateway are registered when minted; links signed by a portal are
    registered the first time they are opened. The token itself is never stored.
    """

    __tablename__ = "viewer_link"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    kid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    viewer_id: Mapped[str] = mapped_column(String(128))
    viewer_name: Mapped[str] = mapped_column(String(200), default="")
    viewer_relationship: Mapped[str] = mapped_column("relationship", String(32))
    key_images_only: Mapped[bool] = mapped_column(Boolean, default=False)
    max_uses: Mapped[int | None] = mapped_column(Integer, nullable=True)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Who minted it ("api_key:portal", "cli") or "portal:<kid>" for portal-signed links.
    minted_by: Mapped[str] = mapped_column(String(200), default="")
    # An IHE IID launch's bearer credential (Principal.credential: "api_key:<key id>",
    # "jwt:<kid>"): its sessions live only while it does (migration 0006_links_hardening).
    credential: Mapped[str | None] = mapped_column(String(200), nullable=True)


class LinkRevocation(Base):
    """A revoked ``jti``, kept whether or not a link of that ``jti`` is registered yet.

    A portal-signed link is registered only when first opened; its revocation must hold before
    that (migration 0006_links_hardening).
    """

    __tablename__ = "viewer_link_revocation"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    revoked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_by: Mapped[str] = mapped_column(String(200), default="")


class ViewerSession(Base):
    """A browser session opened by a viewer link; only the SHA-256 of its id is stored."""

    __tablename__ = "viewer_session"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    jti: Mapped[str] = mapped_column(
        ForeignKey("viewer_link.jti", ondelete="CASCADE"), index=True
    )
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    # JSON list of SOP Instance UIDs for a key-images-only session, else NULL (whole study).
    instance_uids: Mapped[str | None] = mapped_column(Text, nullable=True)
    address: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class AuditRecord(Base):
    """One entry of the access trail (append-only: the migration installs triggers that refuse
    UPDATE and DELETE). Shaped after DICOM PS3.15 A.5 audit messages and FHIR AuditEvent."""

    __tablename__ = "audit_event"
    __table_args__ = (Index("ix_audit_patient_time", "patient_id", "recorded_at"),)

    pk: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    action: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[int] = mapped_column(Integer, default=0)
    actor: Mapped[str] = mapped_column(String(200), default="")
    actor_name: Mapped[str] = mapped_column(String(200), default="")
    actor_relationship: Mapped[str | None] = mapped_column(
        "relationship", String(32), nullable=True
    )
    address: Mapped[str] = mapped_column(String(64), default="")
    patient_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    # JSON list of SOP Instance UIDs, when the access named instances.
    instance_uids: Mapped[str | None] = mapped_column(Text, nullable=True)
    jti: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    detail: Mapped[str] = mapped_column(String(500), default="")


# -- events: the outbox, webhook deliveries and the stable-study scan (migration 0006_events) ---
class Event(Base):
    """One announced change (the outbox, :mod:`gateway.events`), written in the transaction of
    the change itself; ``seq`` orders the change feed and is never reused."""

    __tablename__ = "event"
    __table_args__ = {"sqlite_autoincrement": True}

    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    # The Standard Webhooks message id (``webhook-id``), the same on every delivery attempt.
    id: Mapped[str] = mapped_column(String(64), unique=True)
    type: Mapped[str] = mapped_column(String(32))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The event's ``data`` object (JSON) without ``seq``, which is added when it is served.
    data: Mapped[str] = mapped_column(Text)


class EventDelivery(Base):
    """The delivery of one event to one webhook (``webhook``: a digest of its URL)."""

    __tablename__ = "event_delivery"
    __table_args__ = (
        Index("ix_event_delivery_due", "webhook", "delivered_at", "next_attempt_at"),
        Index("ix_event_delivery_study", "webhook", "study_instance_uid", "seq"),
    )

    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),
        ForeignKey("event.seq", ondelete="CASCADE"), primary_key=True)
    webhook: Mapped[str] = mapped_column(String(32), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When it may be tried next; while a node sends it, the end of that node's lease.
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_error: Mapped[str] = mapped_column(String(500), default="")


class EventStudy(Base):
    """What the stable-study scan knows of a study: the newest instance seen and whether that
    has been announced (``pending`` false) and ever was (``announced``)."""

    __tablename__ = "event_study"
    __table_args__ = (Index("ix_event_study_pending", "pending", "last_instance_at"),)

    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_instance_pk: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    last_instance_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    pending: Mapped[bool] = mapped_column(Boolean, default=True)
    announced: Mapped[bool] = mapped_column(Boolean, default=False)


class EventCursor(Base):
    """A named position: how far the scan has read ``instance`` (``instances``), how far each
    webhook's deliveries have been made from the outbox (``webhook:<digest>``)."""

    __tablename__ = "event_cursor"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), default=0)
