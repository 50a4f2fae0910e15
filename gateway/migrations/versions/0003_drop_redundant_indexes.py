"""drop the single-column indexes that a composite index already starts with

``ix_instance_series_pk`` is the first column of ``ix_instance_series_number`` and
``ix_series_study_pk`` of ``ix_series_study_modality``: every lookup and foreign-key check on
``series_pk`` or ``study_pk`` uses the composite one, and each stored instance no longer
updates a B-tree nobody reads.

Revision ID: 0003_redundant_indexes
Revises: 0002_links
Create Date: 2026-11-26
"""

from alembic import op

revision = "0003_redundant_indexes"
down_revision = "0002_links"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_index("ix_instance_series_pk")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_index("ix_series_study_pk")


def downgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.create_index("ix_series_study_pk", ["study_pk"], unique=False)
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.create_index("ix_instance_series_pk", ["series_pk"], unique=False)
