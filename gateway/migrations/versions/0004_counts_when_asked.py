"""series and instance counts computed when a query asks for them, not kept in the rows

``study.number_of_series``, ``study.number_of_instances`` and ``series.number_of_instances``
were updated by every stored instance: two more statements, and the study's and series' rows
(and ``ix_study_updated_at``) rewritten into the log, for each C-STORE. The query engine now
counts the instances of the studies and series it returns, through the indexes on
``series.study_pk`` and ``instance.series_pk``. ``study.updated_at`` stays (it changes when a
series is added or removed); its index, which no query read, goes.

Revision ID: 0004_counts_when_asked
Revises: 0003_redundant_indexes
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_counts_when_asked"
down_revision = "0003_redundant_indexes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_index("ix_study_updated_at")
        batch_op.drop_column("number_of_series")
        batch_op.drop_column("number_of_instances")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_column("number_of_instances")


def downgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(sa.Column("number_of_instances", sa.Integer(), nullable=False,
                                      server_default="0"))
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.add_column(sa.Column("number_of_instances", sa.Integer(), nullable=False,
                                      server_default="0"))
        batch_op.add_column(sa.Column("number_of_series", sa.Integer(), nullable=False,
                                      server_default="0"))
        batch_op.create_index("ix_study_updated_at", ["updated_at"], unique=False)
    # The counts of the rows that exist, as the columns held them.
    op.execute("UPDATE series SET number_of_instances = "
               "(SELECT COUNT(*) FROM instance WHERE instance.series_pk = series.pk)")
    op.execute("UPDATE study SET number_of_series = "
               "(SELECT COUNT(*) FROM series WHERE series.study_pk = study.pk), "
               "number_of_instances = (SELECT COUNT(*) FROM instance JOIN series "
               "ON instance.series_pk = series.pk WHERE series.study_pk = study.pk)")
