"""viewer links hardening: revocations of any jti, IID sessions bound to their credential

``viewer_link_revocation`` keeps every revoked ``jti``, registered or not: a link signed by a
portal is registered only when it is first opened, and must be revocable before that.
``viewer_link.credential`` names the bearer credential of an IHE IID launch (``api_key:<key
id>``, ``jwt:<kid>``): its sessions end when that credential is revoked or expires.

Revision ID: 0006_links_hardening
Revises: 0005_iocm_dsp_patient
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_links_hardening"
down_revision = "0005_iocm_dsp_patient"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("viewer_link", sa.Column("credential", sa.String(length=200), nullable=True))
    op.create_table(
        "viewer_link_revocation",
        sa.Column("jti", sa.String(length=64), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_by", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("jti"),
    )
    # The links revoked so far keep their revocation in the new table too.
    op.execute("INSERT INTO viewer_link_revocation (jti, revoked_at, revoked_by) "
               "SELECT jti, revoked_at, '' FROM viewer_link WHERE revoked_at IS NOT NULL")


def downgrade() -> None:
    op.drop_table("viewer_link_revocation")
    with op.batch_alter_table("viewer_link") as batch:
        batch.drop_column("credential")
