"""The tenant's permission cache in Redis: one set per role under the tenant's key prefix."""

from collections.abc import Mapping, Sequence

import redis


def prefix(tenant_id: str) -> str:
    return f"tp:{tenant_id}:"


def role_key(tenant_id: str, role: str) -> str:
    return f"{prefix(tenant_id)}perms:{role}"


def client(url: str) -> "redis.Redis[bytes]":
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)


def warm(url: str, tenant_id: str, role_perms: Mapping[str, Sequence[str]]) -> int:
    """Replace each role's permission set atomically; return the number of keys written."""
    r = client(url)
    with r.pipeline(transaction=True) as pipe:
        for role, perms in role_perms.items():
            key = role_key(tenant_id, role)
            pipe.delete(key)
            if perms:
                pipe.sadd(key, *perms)
        pipe.execute()
    return len(role_perms)


def missing_roles(url: str, tenant_id: str, role_perms: Mapping[str, Sequence[str]]) -> list[str]:
    """Roles whose cached permission set is absent or differs from ``role_perms``."""
    r = client(url)
    with r.pipeline(transaction=False) as pipe:
        for role in role_perms:
            pipe.smembers(role_key(tenant_id, role))
        cached = pipe.execute()
    return [
        role
        for role, members in zip(role_perms, cached, strict=True)
        if {m.decode() for m in members} != set(role_perms[role])
    ]


def evict(url: str, tenant_id: str) -> None:
    r = client(url)
    keys = list(r.scan_iter(match=prefix(tenant_id) + "*"))
    if keys:
        r.delete(*keys)
