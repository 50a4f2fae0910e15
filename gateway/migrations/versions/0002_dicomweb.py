"""dicomweb: API keys; indexes for QIDO-RS / C-FIND and series metadata

Revision ID: 0002_dicomweb
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_dicomweb"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_key",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("scopes", sa.String(length=512), nullable=False),
        sa.Column("institution", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("key_id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.create_index("ix_study_referring_physician_name_norm",
                              ["referring_physician_name_norm"], unique=False)
        batch_op.create_index("ix_study_study_id", ["study_id"], unique=False)
    with op.batch_alter_table("series", schema=None) as batch_op:
        # ModalitiesInStudy is matched with EXISTS on the study's series (PS3.18 §8.3.4).
        batch_op.create_index("ix_series_study_modality", ["study_pk", "modality"], unique=False)
        batch_op.create_index("ix_series_study_number", ["study_pk", "series_number"],
                              unique=False)
    with op.batch_alter_table("instance", schema=None) as batch_op:
        # Series /metadata and instance-level QIDO walk a series in InstanceNumber order.
        batch_op.create_index("ix_instance_series_number", ["series_pk", "instance_number"],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_index("ix_instance_series_number")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_index("ix_series_study_number")
        batch_op.drop_index("ix_series_study_modality")
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_index("ix_study_study_id")
        batch_op.drop_index("ix_study_referring_physician_name_norm")
    op.drop_table("api_key")
