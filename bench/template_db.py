"""Issue 5, the shipped path: the database and migration steps of database-per-tenant
PostgreSQL tenants with the pre-migrated template (``TP_TENANT_PG_TEMPLATE=1``, the default)
and without it (a plain ``CREATE DATABASE`` plus every module's migrations).

    .venv/bin/python -m bench.template_db [N] [--load K]     (PostgreSQL as for the tests)

Tenants of the two modes alternate, so a change of machine load hits both alike. The first
tenant with the template also builds it; its time is reported apart (``first_ms``), the
medians are over the other tenants. ``--load K`` runs K busy processes during the measurement.
"""

import argparse
import dataclasses
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import make_settings  # type: ignore[import-not-found]

from tenant_pipelines import assets, registry
from tenant_pipelines.providers import dispose_tenant_engine, drop_templates, provider_for
from tenant_pipelines.registry import Tenant
from tenant_pipelines.settings import Settings


def busy(stop: float) -> None:
    while time.monotonic() < stop:
        pass


def steps(s: Settings, tenant: Tenant) -> tuple[float, float]:
    """The database and migration step bodies' durations, in ms."""
    t0 = time.perf_counter()
    assets.database(s, tenant)
    t1 = time.perf_counter()
    assets.migrations(s, tenant)
    t2 = time.perf_counter()
    return (t1 - t0) * 1000, (t2 - t1) * 1000


def summary(times: list[tuple[float, float]]) -> dict[str, float]:
    first, rest = times[0], times[1:] or times
    return {
        "database_ms": round(statistics.median(d for d, _ in rest), 1),
        "migrations_ms": round(statistics.median(m for _, m in rest), 1),
        "total_ms": round(statistics.median(d + m for d, m in rest), 1),
        "first_ms": round(sum(first), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", nargs="?", type=int, default=8)
    parser.add_argument("--load", type=int, default=0, help="busy processes while measuring")
    args = parser.parse_args()
    base = make_settings(Path(tempfile.mkdtemp()) / "data")
    registry.upgrade(base)
    modes = {
        "plain": dataclasses.replace(base, tenant_pg_template=False),
        "template": dataclasses.replace(base, tenant_pg_template=True),
    }
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    made: list[Tenant] = []
    burners = [
        multiprocessing.Process(target=busy, args=(time.monotonic() + 600,), daemon=True)
        for _ in range(args.load)
    ]
    for p in burners:
        p.start()
    try:
        time.sleep(1 if burners else 0)
        load_start = Path("/proc/loadavg").read_text().split()[0]
        for _ in range(args.n):
            for mode, s in modes.items():
                tid = f"tpl_{uuid.uuid4().hex[:8]}"
                email = f"a@{tid.replace('_', '-')}.example.com"
                registry.create_tenant(
                    s, registry.TenantRequest(id=tid, name="x", admin_email=email), "bench"
                )
                tenant = registry.get_tenant(s, tid)
                made.append(tenant)
                times[mode].append(steps(s, tenant))
        load_end = Path("/proc/loadavg").read_text().split()[0]
    finally:
        for p in burners:
            p.terminate()
        for tenant in made:
            dispose_tenant_engine(tenant.id)
            provider_for(base, tenant).drop()
        drop_templates(base)
    res: dict[str, object] = {m: summary(t) for m, t in times.items()}
    res.update(n=args.n, busy_processes=args.load, loadavg_1m=[load_start, load_end])
    print(json.dumps(res))


if __name__ == "__main__":
    main()
