"""viewer links (jti registry), viewer sessions, access trail (append-only)

Revision ID: 0002_links
Revises: 0002_dicomweb
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_links"
down_revision = "0002_dicomweb"  # chained after the DICOMweb migration
branch_labels = None
depends_on = None

APPEND_ONLY = "the access trail is append-only"


def upgrade() -> None:
    op.create_table(
        "viewer_link",
        sa.Column("jti", sa.String(length=64), nullable=False),
        sa.Column("kid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("viewer_id", sa.String(length=128), nullable=False),
        sa.Column("viewer_name", sa.String(length=200), nullable=False),
        sa.Column("relationship", sa.String(length=32), nullable=False),
        sa.Column("key_images_only", sa.Boolean(), nullable=False),
        sa.Column("max_uses", sa.Integer(), nullable=True),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("minted_by", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("jti"),
    )
    op.create_index("ix_viewer_link_study_instance_uid", "viewer_link", ["study_instance_uid"])
    op.create_index("ix_viewer_link_expires_at", "viewer_link", ["expires_at"])

    op.create_table(
        "viewer_session",
        sa.Column("id_hash", sa.String(length=64), nullable=False),
        sa.Column("jti", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("instance_uids", sa.Text(), nullable=True),
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["jti"], ["viewer_link.jti"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id_hash"),
    )
    op.create_index("ix_viewer_session_jti", "viewer_session", ["jti"])
    op.create_index("ix_viewer_session_expires_at", "viewer_session", ["expires_at"])

    op.create_table(
        "audit_event",
        sa.Column("pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  autoincrement=True, nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("outcome", sa.Integer(), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("actor_name", sa.String(length=200), nullable=False),
        sa.Column("relationship", sa.String(length=32), nullable=True),
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("instance_uids", sa.Text(), nullable=True),
        sa.Column("jti", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.String(length=500), nullable=False),
        sa.PrimaryKeyConstraint("pk"),
    )
    op.create_index("ix_audit_patient_time", "audit_event", ["patient_id", "recorded_at"])
    op.create_index("ix_audit_event_recorded_at", "audit_event", ["recorded_at"])
    op.create_index("ix_audit_event_study_instance_uid", "audit_event", ["study_instance_uid"])
    op.create_index("ix_audit_event_jti", "audit_event", ["jti"])

    # Append-only: the database itself refuses to change or delete a trail entry.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"""
            CREATE FUNCTION audit_event_append_only() RETURNS trigger AS $$
            BEGIN RAISE EXCEPTION '{APPEND_ONLY}'; END; $$ LANGUAGE plpgsql
        """)
        op.execute("""
            CREATE TRIGGER audit_event_append_only BEFORE UPDATE OR DELETE ON audit_event
            FOR EACH ROW EXECUTE FUNCTION audit_event_append_only()
        """)
    else:
        for event in ("UPDATE", "DELETE"):
            op.execute(f"""
                CREATE TRIGGER audit_event_no_{event.lower()} BEFORE {event} ON audit_event
                BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END
            """)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_event_append_only ON audit_event")
        op.execute("DROP FUNCTION IF EXISTS audit_event_append_only()")
    op.drop_table("audit_event")
    op.drop_table("viewer_session")
    op.drop_table("viewer_link")
