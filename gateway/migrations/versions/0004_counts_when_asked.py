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

import sqlite3

import sqlalchemy as sa
from alembic import op

revision = "0004_counts_when_asked"
down_revision = "0003_redundant_indexes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_study_updated_at", table_name="study")
    for table, column in (("study", "number_of_series"), ("study", "number_of_instances"),
                          ("series", "number_of_instances")):
        _drop_column(table, column)


def _drop_column(table: str, column: str) -> None:
    """``ALTER TABLE ... DROP COLUMN``, on SQLite too (3.35 and later): batch mode would copy
    the table, and dropping the old ``study`` or ``series`` table would delete, by its
    ``ON DELETE CASCADE`` foreign keys, every series and instance under it."""
    if op.get_bind().dialect.name != "sqlite":
        op.drop_column(table, column)
        return
    if sqlite3.sqlite_version_info < (3, 35):
        raise RuntimeError(f"SQLite {sqlite3.sqlite_version} cannot drop a column; 3.35 or "
                           "later is needed for this migration")
    op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")


def downgrade() -> None:
    for table, column in (("series", "number_of_instances"), ("study", "number_of_instances"),
                          ("study", "number_of_series")):
        op.add_column(table, sa.Column(column, sa.Integer(), nullable=False,
                                       server_default="0"))
    op.create_index("ix_study_updated_at", "study", ["updated_at"], unique=False)
    # The counts of the rows that exist, as the columns held them.
    op.execute("UPDATE series SET number_of_instances = "
               "(SELECT COUNT(*) FROM instance WHERE instance.series_pk = series.pk)")
    op.execute("UPDATE study SET number_of_series = "
               "(SELECT COUNT(*) FROM series WHERE series.study_pk = study.pk), "
               "number_of_instances = (SELECT COUNT(*) FROM instance JOIN series "
               "ON instance.series_pk = series.pk WHERE series.study_pk = study.pk)")
