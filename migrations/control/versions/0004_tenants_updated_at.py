"""Index tenants.updated_at: the API's read model polls for rows changed since its last look.

Revision ID: control_0004
Revises: control_0003
"""

from alembic import op

revision = "control_0004"
down_revision = "control_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tenants_updated_at", "tenants", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_tenants_updated_at", table_name="tenants")
