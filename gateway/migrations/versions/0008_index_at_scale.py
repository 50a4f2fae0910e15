"""the index at national scale: person-name indexes that serve prefix matching on PostgreSQL

QIDO-RS and C-FIND match ``PatientName=SCHM*`` (and ReferringPhysicianName) with ``LIKE
'SCHM%'`` on PostgreSQL. A B-tree in the database's collation (``C.UTF-8``, ``en_US.UTF-8``)
cannot serve LIKE, so the planner read every patient row; an index in the
``varchar_pattern_ops`` operator class compares bytes and serves both the prefix and equality.
The indexes keep their names and columns; SQLite (GLOB, which its own index serves) is left as
it was.

Revision ID: 0008_index_at_scale
Revises: 0007_events_outbox
Create Date: 2026-12-06
"""

from alembic import op

revision = "0008_index_at_scale"
down_revision = "0007_events_outbox"
branch_labels = None
depends_on = None

# (table, index, column) matched by LIKE with a literal prefix.
PATTERN_INDEXES = [
    ("patient", "ix_patient_patient_name_norm", "patient_name_norm"),
    ("study", "ix_study_referring_physician_name_norm", "referring_physician_name_norm"),
]


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, name, column in PATTERN_INDEXES:
        op.drop_index(name, table_name=table)
        op.create_index(name, table, [column], postgresql_ops={column: "varchar_pattern_ops"})


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, name, column in PATTERN_INDEXES:
        op.drop_index(name, table_name=table)
        op.create_index(name, table, [column])
