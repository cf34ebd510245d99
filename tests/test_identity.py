"""Seeding is idempotent; reset tokens are one-time, hashed, expiring and single-valid."""

import datetime as dt

import sqlalchemy as sa
from conftest import Tenants

from tenant_pipelines import identity, migrate
from tenant_pipelines.providers import provider_for, tenant_engine
from tenant_pipelines.registry import Tenant
from tenant_pipelines.settings import Settings


def migrated(settings: Settings, tenants: Tenants, **kw: object) -> tuple[Tenant, sa.Engine]:
    tenant = tenants.create(**kw)
    provider_for(settings, tenant).ensure()
    eng = tenant_engine(settings, tenant)
    migrate.apply(settings.migrations_dir, eng, tenant)
    return tenant, eng


def test_seed_twice_creates_each_row_once(settings: Settings, tenants: Tenants) -> None:
    tenant, eng = migrated(settings, tenants)
    first = identity.seed(eng, tenant, "c1")
    second = identity.seed(eng, tenant, "c1")
    assert first == second
    assert first == {
        "roles": len(identity.ROLES),
        "permissions": len(identity.PERMISSIONS),
        "role_permissions": sum(len(p) for p in identity.ROLE_PERMISSIONS.values()),
        "users": 1,
        "user_roles": 1,
    }
    assert identity.role_permission_sets(eng) == {
        r: sorted(p) for r, p in identity.ROLE_PERMISSIONS.items()
    }


def test_seed_interrupted_half_way_then_rerun_has_no_duplicates(
    settings: Settings, tenants: Tenants
) -> None:
    tenant, eng = migrated(settings, tenants, demo_data=True)
    # The first attempt got as far as the catalog and one user, then died.
    with eng.begin() as conn:
        identity.seed_catalog(conn)
        identity.upsert_user(conn, tenant.admin_email.upper(), "Old name", "member")
    counts = identity.seed(eng, tenant, "c2")
    assert counts["users"] == 1 + len(identity.DEMO_USERS)
    with eng.connect() as conn:
        admin = (
            conn.execute(
                sa.select(identity.users).where(identity.users.c.email == tenant.admin_email)
            )
            .mappings()
            .one()
        )
        roles = (
            conn.execute(
                sa.select(identity.roles.c.name)
                .select_from(
                    identity.user_roles.join(
                        identity.roles, identity.roles.c.id == identity.user_roles.c.role_id
                    )
                )
                .where(identity.user_roles.c.user_id == admin["id"])
            )
            .scalars()
            .all()
        )
    assert admin["display_name"] == "Tenant administrator"  # upserted, not duplicated
    assert sorted(roles) == ["admin", "member"]


def test_seed_writes_tenant_metadata(settings: Settings, tenants: Tenants) -> None:
    tenant, eng = migrated(settings, tenants)
    identity.seed(eng, tenant, "c3")
    with eng.connect() as conn:
        values = dict(
            conn.execute(
                sa.select(identity.tenant_settings.c.key, identity.tenant_settings.c.value)
            )
            .tuples()
            .all()
        )
    assert values["identifier"] == tenant.id
    assert values["name"] == tenant.name
    assert values["modules"] == list(tenant.modules)


def test_reset_token_is_stored_hashed_and_works_once(settings: Settings, tenants: Tenants) -> None:
    tenant, eng = migrated(settings, tenants)
    identity.seed(eng, tenant, None)
    token = identity.issue_reset_token(eng, tenant, 3600)
    assert len(token) >= 43  # 32 random bytes, base64url
    with eng.connect() as conn:
        stored = conn.execute(sa.select(identity.user_tokens.c.token_hash)).scalars().all()
    assert token not in stored and identity.token_hash(token) in stored
    assert identity.reset_password(eng, token, "a new password!") == tenant.admin_email
    assert identity.reset_password(eng, token, "again") is None
    with eng.connect() as conn:
        pw = conn.execute(sa.select(identity.users.c.password_hash)).scalar_one()
    assert identity.verify_password("a new password!", pw)
    assert not identity.verify_password("wrong", pw)


def test_new_token_revokes_the_previous_one(settings: Settings, tenants: Tenants) -> None:
    tenant, eng = migrated(settings, tenants)
    identity.seed(eng, tenant, None)
    old = identity.issue_reset_token(eng, tenant, 3600)
    new = identity.issue_reset_token(eng, tenant, 3600)
    assert identity.valid_reset_tokens(eng, tenant) == 1
    assert identity.reset_password(eng, old, "pw-old-token") is None
    assert identity.reset_password(eng, new, "pw-new-token") == tenant.admin_email


def test_expired_token_is_refused(settings: Settings, tenants: Tenants) -> None:
    tenant, eng = migrated(settings, tenants)
    identity.seed(eng, tenant, None)
    token = identity.issue_reset_token(eng, tenant, 3600)
    with eng.begin() as conn:
        conn.execute(
            identity.user_tokens.update().values(
                expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
            )
        )
    assert identity.reset_password(eng, token, "too late") is None


def test_another_tenants_token_does_not_work_here(settings: Settings, tenants: Tenants) -> None:
    a, eng_a = migrated(settings, tenants)
    b, eng_b = migrated(settings, tenants)
    identity.seed(eng_a, a, None)
    identity.seed(eng_b, b, None)
    token_a = identity.issue_reset_token(eng_a, a, 3600)
    assert identity.reset_password(eng_b, token_a, "cross tenant") is None
