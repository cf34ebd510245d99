"""Template-database direction of issue 5: the floor's step times against
``CREATE DATABASE ... TEMPLATE`` plus an at-head migration check.

    .venv/bin/python -m bench.template_db [N]     (PostgreSQL and Redis as for the tests)
"""

import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import psycopg
from conftest import PG_LIBPQ, make_settings  # type: ignore[import-not-found]
from psycopg import sql

from tenant_pipelines import assets, registry
from tenant_pipelines.providers import dispose_tenant_engine, provider_for


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    s = make_settings(Path(tempfile.mkdtemp()) / "data")
    registry.upgrade(s)
    names = ("validate", "database", "migrations", "seeded", "credentials", "cached", "verified")
    steps: dict[str, list[float]] = {k: [] for k in ("catalog", *names)}
    made = []
    for _ in range(n):
        tid = f"tpl_{uuid.uuid4().hex[:8]}"
        email = f"a@{tid.replace('_', '-')}.example.com"
        t0 = time.perf_counter()
        registry.create_tenant(
            s, registry.TenantRequest(id=tid, name="x", admin_email=email), "bench"
        )
        steps["catalog"].append(time.perf_counter() - t0)
        t = registry.get_tenant(s, tid)
        made.append(t)
        for name in names:
            t0 = time.perf_counter()
            getattr(assets, name)(s, t)
            steps[name].append(time.perf_counter() - t0)
    res: dict[str, object] = {k: round(statistics.median(v) * 1000, 1) for k, v in steps.items()}
    # The first tenant's migrated database as TEMPLATE (no session may be connected to it).
    tpl = made[0]
    dispose_tenant_engine(tpl.id)
    clone, noop = [], []
    with psycopg.connect(PG_LIBPQ, autocommit=True) as conn:
        for _ in range(n):
            name = f"tplc_{uuid.uuid4().hex[:8]}"
            t0 = time.perf_counter()
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(tpl.location)
                )
            )
            clone.append(time.perf_counter() - t0)
            conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
    # The migration step on an already migrated database: what remains after a clone.
    for _ in range(n):
        t0 = time.perf_counter()
        assets.migrations(s, made[1])
        noop.append(time.perf_counter() - t0)
    res["clone_template"] = round(statistics.median(clone) * 1000, 1)
    res["migrations_noop"] = round(statistics.median(noop) * 1000, 1)
    res["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    print(json.dumps(res))
    for t in made:
        dispose_tenant_engine(t.id)
        provider_for(s, t).drop()


if __name__ == "__main__":
    main()
