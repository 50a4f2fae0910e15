"""Events: the outbox, webhook deliveries, the stable-study scan's state (gateway.events)

Revision ID: 0007_events_outbox
Revises: 0006_links_hardening
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_events_outbox"
down_revision = "0006_links_hardening"
branch_labels = None
depends_on = None

BIG = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "event",
        sa.Column("seq", BIG, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_event_study_instance_uid", "event", ["study_instance_uid"])
    op.create_table(
        "event_delivery",
        sa.Column("seq", BIG, sa.ForeignKey("event.seq", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("webhook", sa.String(32), primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(500), nullable=False),
    )
    op.create_index("ix_event_delivery_due", "event_delivery",
                    ["webhook", "delivered_at", "next_attempt_at"])
    op.create_index("ix_event_delivery_study", "event_delivery",
                    ["webhook", "study_instance_uid", "seq"])
    op.create_table(
        "event_study",
        sa.Column("study_instance_uid", sa.String(64), primary_key=True),
        sa.Column("last_instance_pk", BIG, nullable=False),
        sa.Column("last_instance_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("pending", sa.Boolean(), nullable=False),
        sa.Column("announced", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_event_study_pending", "event_study", ["pending", "last_instance_at"])
    op.create_table(
        "event_cursor",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", BIG, nullable=False),
    )
    # The scan starts after the instances stored before events existed: they are not
    # announced (the archive's history is not news).
    op.execute("INSERT INTO event_cursor (name, value) "
               "SELECT 'instances', COALESCE(MAX(pk), 0) FROM instance")


def downgrade() -> None:
    op.drop_table("event_cursor")
    op.drop_table("event_study")
    op.drop_table("event_delivery")
    op.drop_table("event")
