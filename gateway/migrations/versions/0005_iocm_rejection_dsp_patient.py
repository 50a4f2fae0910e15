"""IOCM rejected instances; DSP creation dates kept per patient identity, apart from studies

``rejected_instance`` remembers each instance a rejection note took out of the index (and the
note itself), so that a re-send is refused. ``dsp_patient`` holds the DSP creation date of a
patient identity (PatientID, IssuerOfPatientID) whether or not a study of it is stored; the
dates recorded in ``patient.dsp_created`` move there, and the column goes.

Revision ID: 0005_iocm_dsp_patient
Revises: 0004_counts_when_asked
Create Date: 2026-12-06
"""

import sqlite3

import sqlalchemy as sa
from alembic import op

revision = "0005_iocm_dsp_patient"
down_revision = "0004_counts_when_asked"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rejected_instance",
        sa.Column("sop_instance_uid", sa.String(64), primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(64), nullable=False),
        sa.Column("code", sa.String(16), nullable=False),
        sa.Column("note_uid", sa.String(64), nullable=False),
        sa.Column("file_path", sa.String(512), nullable=True),
        sa.Column("digest", sa.String(64), nullable=True),
        sa.Column("rejected_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_rejected_instance_study_instance_uid", "rejected_instance",
                    ["study_instance_uid"])
    op.create_index("ix_rejected_instance_note_uid", "rejected_instance", ["note_uid"])
    op.create_table(
        "dsp_patient",
        sa.Column("patient_id", sa.String(64), primary_key=True),
        sa.Column("issuer_of_patient_id", sa.String(64), primary_key=True),
        sa.Column("dsp_created", sa.String(8), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    # The dates recorded so far, per identity (the earliest where rows disagree).
    op.execute(
        "INSERT INTO dsp_patient (patient_id, issuer_of_patient_id, dsp_created, updated_at) "
        "SELECT patient_id, issuer_of_patient_id, MIN(dsp_created), CURRENT_TIMESTAMP "
        "FROM patient WHERE dsp_created IS NOT NULL "
        "GROUP BY patient_id, issuer_of_patient_id")
    _drop_column("patient", "dsp_created")


def _drop_column(table: str, column: str) -> None:
    """In place on SQLite too (3.35+): batch mode would copy the table, and dropping the old
    one would delete every study under it through ``ON DELETE CASCADE`` (see 0004)."""
    if op.get_bind().dialect.name != "sqlite":
        op.drop_column(table, column)
        return
    if sqlite3.sqlite_version_info < (3, 35):
        raise RuntimeError(f"SQLite {sqlite3.sqlite_version} cannot drop a column; 3.35 or "
                           "later is needed for this migration")
    op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")


def downgrade() -> None:
    op.add_column("patient", sa.Column("dsp_created", sa.String(8), nullable=True))
    op.execute("UPDATE patient SET dsp_created = (SELECT d.dsp_created FROM dsp_patient d "
               "WHERE d.patient_id = patient.patient_id AND d.issuer_of_patient_id IN "
               "(patient.issuer_of_patient_id, '') ORDER BY d.issuer_of_patient_id DESC "
               "LIMIT 1)")
    op.drop_table("dsp_patient")
    op.drop_index("ix_rejected_instance_note_uid", table_name="rejected_instance")
    op.drop_index("ix_rejected_instance_study_instance_uid", table_name="rejected_instance")
    op.drop_table("rejected_instance")
