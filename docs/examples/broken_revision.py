"""A revision that fails on purpose, for the README's break-and-retry walk-through.

Copy it to migrations/identity/versions/9999_broken.py, provision a tenant (it fails at
tenant_migrations naming module identity and revision identity_9999), delete the copy, then
`tenantctl retry ID --wait`: the retry resumes at the migration step.

Revision ID: identity_9999
"""

from alembic import op

revision = "identity_9999"
down_revision = "identity_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE no_such_table ADD COLUMN x int")


def downgrade() -> None:
    pass
