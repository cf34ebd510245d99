"""Control-plane catalog: tenants and the audit trail.

Revision ID: control_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "control_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("provider", sa.String(20), nullable=False),
        sa.Column("strategy", sa.String(20), nullable=False),
        sa.Column("server", sa.String(255), nullable=False),
        sa.Column("location", sa.String(255), nullable=False),
        sa.Column("admin_email", sa.String(254), nullable=False),
        sa.Column("is_active", sa.Boolean, nullable=False),
        sa.Column("valid_until", sa.DateTime(timezone=True)),
        sa.Column("demo_data", sa.Boolean, nullable=False),
        sa.Column("modules", sa.JSON, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("status_reason", sa.Text),
        sa.Column("correlation_id", sa.String(32)),
        sa.Column("run_id", sa.String(64)),
        sa.Column("credentials_state", sa.String(20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("provider", "server", "location", name="uq_tenants_location"),
    )
    op.create_index("ix_tenants_status", "tenants", ["status"])
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("event", sa.String(40), nullable=False),
        sa.Column("actor", sa.String(120), nullable=False),
        sa.Column("correlation_id", sa.String(32)),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("details", sa.JSON, nullable=False),
    )
    op.create_index("ix_audit_events_tenant", "audit_events", ["tenant_id", "id"])


def downgrade() -> None:
    op.drop_table("audit_events")
    op.drop_table("tenants")
