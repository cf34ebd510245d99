"""Benchmark suite of issue 5: ``.venv/bin/python -m bench [--smoke] [sizes...]``.

Runs against the real PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) with the
production-style configuration: a fresh PostgreSQL control-plane database, a fresh
dagster-postgres database with ``deploy/dagster.postgres.yaml`` as the instance config, the
service and daemon started by ``tenantctl serve`` in a subprocess. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
import yaml  # type: ignore[import-untyped]
from psycopg import sql

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
PG_LIBPQ = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------- small helpers
def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p95": pct(values, 95),
        "p99": pct(values, 99),
        "max": max(values) if values else float("nan"),
    }


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pg_exec(statement: sql.Composed) -> None:
    with psycopg.connect(PG_LIBPQ, autocommit=True) as conn:
        conn.execute(statement)


# ---------------------------------------------------------------- memory from /proc
def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(root: int) -> list[int]:
    children, out, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _kb(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _name(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(a.decode(errors="replace") for a in argv if a)
    for key, label in (
        # Order matters: a code server's argv carries the instance config, which names
        # tenant_pipelines.launcher.
        ("api grpc", "code server"),
        ("tenant_pipelines.cli serve", "service (API + UI)"),
        ("-m tenant_pipelines.launcher", "dagster daemon"),
        ("forkserver", "forkserver / run worker"),
        ("resource_tracker", "multiprocessing resource tracker"),
    ):
        if key in text:
            return label
    return text[:60]


def memory(root: int) -> dict[str, Any]:
    """RSS (VmRSS, double-counts shared pages) and PSS (shares split) of every process."""
    procs = []
    for pid in process_tree(root):
        rss = _kb(f"/proc/{pid}/status", "VmRSS")
        pss = _kb(f"/proc/{pid}/smaps_rollup", "Pss")
        if rss:
            procs.append(
                {"pid": pid, "name": _name(pid), "rss_mb": rss / 1024, "pss_mb": pss / 1024}
            )
    return {
        "processes": len(procs),
        "rss_mb": sum(p["rss_mb"] for p in procs),
        "pss_mb": sum(p["pss_mb"] for p in procs),
        "detail": procs,
    }


class MemorySampler:
    """Samples the service's memory and PostgreSQL's connection count every ``interval``
    seconds in a thread; keeps the peaks."""

    def __init__(self, root: int, interval: float = 1.0) -> None:
        self.root, self.interval = root, interval
        self.peak: dict[str, Any] = {"rss_mb": 0.0, "pss_mb": 0.0}
        self.peak_connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with psycopg.connect(PG_LIBPQ, autocommit=True) as conn:
            while not self._stop.wait(self.interval):
                m = memory(self.root)
                if m["pss_mb"] > self.peak["pss_mb"]:
                    self.peak = m
                row = conn.execute("SELECT count(*) FROM pg_stat_activity").fetchone()
                self.peak_connections = max(self.peak_connections, int(row[0]) if row else 0)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- the service under test
@dataclass
class Service:
    """A ``tenantctl serve`` on fresh databases; ``launcher`` is "warm" or "default"."""

    launcher: str
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    token: str = ""

    def __post_init__(self) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"bench_{self.launcher}_"))
        self.control_db = f"bench_ctl_{self.tag}"
        self.dagster_db = f"bench_dg_{self.tag}"
        self.url = f"http://127.0.0.1:{self.port}"
        home = self.data_dir / "dagster"
        home.mkdir()
        config = yaml.safe_load((REPO / "deploy" / "dagster.postgres.yaml").read_text())
        if self.launcher == "default":
            # Dagster's stock path: DefaultRunLauncher (a spawned worker per run through the
            # code server) and the integer 1 s queue interval; everything else identical.
            config.pop("run_launcher")
            config["run_coordinator"] = {
                "module": "dagster.core.run_coordinator",
                "class": "QueuedRunCoordinator",
                "config": {"dequeue_interval_seconds": 1},
            }
        (home / "dagster.yaml").write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TP_", "DAGSTER_"))}
        env.update(
            {
                "DAGSTER_HOME": str(home),
                "DAGSTER_PG_URL": f"postgresql+psycopg2://postgres@127.0.0.1:5432/{self.dagster_db}",
                "TP_DATA_DIR": str(self.data_dir / "data"),
                "TP_CONTROL_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.control_db}",
                "TP_TENANT_PG_URL": PG_ADMIN,
                "TP_REDIS_URL": REDIS_URL,
                "TP_LOCATION_PREFIX": f"b{self.tag}_",
            }
        )
        self.env = env

    def tenantctl(self, *args: str, stdin: str = "") -> str:
        out = subprocess.run(
            [PY, "-m", "tenant_pipelines.cli", *args],
            input=stdin.encode(),
            capture_output=True,
            env=self.env,
            cwd=REPO,
            check=False,
        )
        if out.returncode:
            raise RuntimeError(f"tenantctl {args[:2]} failed: {out.stderr.decode()[-2000:]}")
        return out.stdout.decode()

    def start(self) -> Service:
        for db in (self.control_db, self.dagster_db):
            pg_exec(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
        password = uuid.uuid4().hex + "Aa1!"
        self.tenantctl("admin", "create", "bench@example.com", stdin=password + "\n")
        self.token = json.loads(
            self.tenantctl("admin", "token", "create", "--name", "bench", "--json")
        )["token"]
        self.proc = subprocess.Popen(
            [PY, "-m", "tenant_pipelines.cli", "serve", "--port", str(self.port)],
            cwd=REPO,
            env=self.env,
            stdout=(self.data_dir / "serve.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.data_dir / "serve.log").read_text()[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health/live", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError("tenantctl serve did not come up")
        with self.client() as c:  # the root tenant's bootstrap run must not disturb phase 1
            wait_active(c, ["root"], timeout=180)
        return self

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=timeout
        )

    def async_client(self, connections: int, timeout: float = 30) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=timeout,
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

    def settings(self) -> Any:
        from tenant_pipelines.settings import Settings

        return Settings.from_env(self.env).ensure_secret_key()

    def run_count(self) -> int:
        url = f"postgresql://postgres@127.0.0.1:5432/{self.dagster_db}"
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT count(*) FROM runs").fetchone()
        return int(row[0]) if row else 0

    def stop(self, keep: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if keep:
            log(f"kept {self.data_dir}, databases {self.control_db}, {self.dagster_db}")
            return
        self._drop_tenants()
        for db in (self.control_db, self.dagster_db):
            with contextlib.suppress(Exception):
                pg_exec(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db))
                )
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def _drop_tenants(self) -> None:
        with contextlib.suppress(Exception):
            with psycopg.connect(PG_LIBPQ, autocommit=True) as conn:
                names = [
                    r[0]
                    for r in conn.execute(
                        "SELECT datname FROM pg_database WHERE datname LIKE %s",
                        (f"b{self.tag}\\_%",),
                    )
                ]
                for name in names:
                    conn.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(name)
                        )
                    )
        with contextlib.suppress(Exception):
            r = redis.Redis.from_url(REDIS_URL)
            for tenant_id in self._ids:
                keys = list(r.scan_iter(match=f"tp:{tenant_id}:*"))
                if keys:
                    r.delete(*keys)

    _ids: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- API helpers
class TenantFailed(RuntimeError):
    pass


def new_id(svc: Service) -> str:
    tenant_id = f"b{svc.tag}_{len(svc._ids):05d}"
    svc._ids.append(tenant_id)
    return tenant_id


def tenant_body(tenant_id: str) -> dict[str, Any]:
    return {
        "id": tenant_id,
        "name": f"Bench {tenant_id}",
        "admin_email": f"admin@{tenant_id.replace('_', '-')}.example.com",
    }


def status(c: httpx.Client, tenant_id: str) -> str:
    r = c.get(f"/api/tenants/{tenant_id}")
    r.raise_for_status()
    return str(r.json()["tenant"]["status"])


def wait_active(c: httpx.Client, ids: list[str], timeout: float, poll: float = 0.05) -> float:
    """Poll until every tenant is active; returns the monotonic time it happened."""
    pending, deadline = set(ids), time.monotonic() + timeout
    while pending:
        for tenant_id in list(pending):
            with contextlib.suppress(httpx.HTTPError):
                s = status(c, tenant_id)
                if s == "active":
                    pending.discard(tenant_id)
                elif s in ("failed", "cancelled"):
                    raise TenantFailed(f"{tenant_id} ended {s}")
        if pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} tenants not active after {timeout}s")
            time.sleep(poll)
    return time.monotonic()


def _ids_with_status(c: httpx.Client, status: str) -> set[str]:
    out: set[str] = set()
    offset = 0
    while True:
        r = c.get("/api/tenants", params={"status": status, "limit": 500, "offset": offset})
        r.raise_for_status()
        page = r.json()
        out.update(t["id"] for t in page["items"])
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            return out


def wait_all_active(c: httpx.Client, ids: list[str], timeout: float, poll: float = 0.5) -> float:
    """Like :func:`wait_active` for many tenants, one list query per status and round (a
    GET per tenant and round would load the service more than the runs do)."""
    wanted, deadline = set(ids), time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            ended = wanted & (_ids_with_status(c, "failed") | _ids_with_status(c, "cancelled"))
            if ended:
                raise TenantFailed(
                    f"{len(ended)} tenants failed or were cancelled: {sorted(ended)[:5]}"
                )
            pending = wanted & (
                _ids_with_status(c, "requested") | _ids_with_status(c, "provisioning")
            )
            if not pending:
                return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"tenants not active after {timeout}s")
        time.sleep(poll)


def create_one(c: httpx.Client, svc: Service) -> float:
    """POST /api/tenants, then poll until active: the create -> active latency."""
    tenant_id = new_id(svc)
    t0 = time.monotonic()
    r = c.post("/api/tenants", json=tenant_body(tenant_id))
    if r.status_code != 202:
        raise RuntimeError(f"create {tenant_id}: {r.status_code} {r.text[:300]}")
    return wait_active(c, [tenant_id], timeout=300) - t0


def sequential(svc: Service, n: int) -> list[float]:
    with svc.client() as c:
        return [create_one(c, svc) for _ in range(n)]


def burst(svc: Service, n: int, timeout: float = 1800) -> dict[str, Any]:
    """n POSTs at once; time from the first POST until all n are active."""
    ids = [new_id(svc) for _ in range(n)]

    accept: list[float] = []

    async def post(ac: httpx.AsyncClient, tenant_id: str) -> int:
        t = time.monotonic()
        r = await ac.post("/api/tenants", json=tenant_body(tenant_id))
        accept.append(time.monotonic() - t)
        return r.status_code

    async def post_all() -> list[int]:
        # A long timeout: under a burst the API answers creates one submission at a time.
        async with svc.async_client(n, timeout=600) as ac:
            return list(await asyncio.gather(*(post(ac, i) for i in ids)))

    t0 = time.monotonic()
    codes = asyncio.run(post_all())
    accepted = time.monotonic() - t0
    bad = [c for c in codes if c != 202]
    if bad:
        raise RuntimeError(f"burst: {len(bad)} creates refused: {bad[:5]}")
    with svc.client() as c:
        done = wait_all_active(c, ids, timeout=timeout) - t0
    return {
        "n": n,
        "accepted_s": accepted,
        "post_latency_s": summary(accept),
        "all_active_s": done,
        "tenants_per_minute": n / done * 60,
    }


def reverify(svc: Service, ids: list[str]) -> list[float]:
    """POST /api/tenants/{id}/activate on an active tenant; time until active again."""
    out = []
    with svc.client() as c:
        for tenant_id in ids:
            t0 = time.monotonic()
            r = c.post(f"/api/tenants/{tenant_id}/activate", json={})
            if r.status_code != 202:
                raise RuntimeError(f"activate {tenant_id}: {r.status_code} {r.text[:300]}")
            out.append(wait_active(c, [tenant_id], timeout=300) - t0)
    return out


def status_reads(svc: Service, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` concurrent clients for ``seconds``, alternating the two status reads."""
    ids = list(svc._ids)
    lat: dict[str, list[float]] = {"provisioning": [], "list": []}
    errors = {"provisioning": 0, "list": 0}

    async def worker(ac: httpx.AsyncClient, stop: float, rnd: random.Random) -> None:
        kind = rnd.choice(("provisioning", "list"))
        while time.monotonic() < stop:
            if kind == "provisioning":
                path = f"/api/tenants/{rnd.choice(ids)}/provisioning"
            else:
                path = f"/api/tenants?limit=50&offset={rnd.randrange(max(1, len(ids) - 50))}"
            t0 = time.monotonic()
            try:
                r = await ac.get(path)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                lat[kind].append(time.monotonic() - t0)
            else:
                errors[kind] += 1
            kind = "list" if kind == "provisioning" else "provisioning"

    async def run() -> None:
        async with svc.async_client(clients) as ac:
            stop = time.monotonic() + seconds
            await asyncio.gather(*(worker(ac, stop, random.Random(i)) for i in range(clients)))

    asyncio.run(run())
    return {
        kind: {
            **{k: v * 1000 for k, v in summary(lat[kind]).items() if k != "n"},
            "n": len(lat[kind]),
            "errors": errors[kind],
            "rps": len(lat[kind]) / seconds,
        }
        for kind in lat
    }


WRK_KINDS = {
    "provisioning": 'wrk.format("GET", "/api/tenants/" .. ids[math.random(#ids)] .. '
    '"/provisioning", h)',
    "list": 'wrk.format("GET", "/api/tenants?limit=50&offset=" .. math.random(0, pages), h)',
}


def _wrk_ms(text: str) -> float:
    """A wrk latency ("812.00us", "4.82ms", "1.23s") in milliseconds."""
    for unit, factor in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    raise ValueError(text)


def status_reads_wrk(svc: Service, clients: int, seconds: float) -> dict[str, Any]:
    """The status reads with ``wrk`` (C, one thread): ``clients`` connections for ``seconds``
    per kind. A Python client on the same 2 cores saturates long before the service does
    (about 3.5 ms of client CPU per request with httpx), so its latencies are its own."""
    ids = ",".join(f'"{i}"' for i in svc._ids)
    out: dict[str, Any] = {}
    for kind, call in WRK_KINDS.items():
        script = svc.data_dir / f"{kind}.lua"
        script.write_text(
            f"local ids = {{{ids}}}\nlocal pages = {max(0, len(svc._ids) - 50)}\n"
            f'request = function()\n  local h = {{["Authorization"] = "Bearer {svc.token}"}}\n'
            f"  return {call}\nend\n"
        )
        args = ["wrk", "-t1", f"-c{clients}", "--latency", "-s", str(script), svc.url]
        subprocess.run([*args[:3], "-d2s", *args[3:]], capture_output=True, check=True)  # warm
        text = subprocess.run(
            [*args[:3], f"-d{seconds:.0f}s", *args[3:]], capture_output=True, check=True
        ).stdout.decode()
        lat = {}
        errors = 0
        rps = 0.0
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] in ("50%", "75%", "90%", "99%"):
                lat["p" + parts[0][:-1]] = _wrk_ms(parts[1])
            elif line.startswith("Requests/sec:"):
                rps = float(parts[1])
            elif line.strip().startswith("Non-2xx"):
                errors += int(parts[-1])
            elif line.strip().startswith("Socket errors:"):
                errors += sum(int(x.rstrip(",")) for x in parts[3::2])
        out[kind] = {**lat, "rps": rps, "errors": errors, "client": "wrk", "raw": text}
    return out


def reads_of(svc: Service, clients: int, seconds: float) -> dict[str, Any]:
    """Status reads with wrk when it is installed (apt install wrk), else the Python client."""
    if shutil.which("wrk"):
        return status_reads_wrk(svc, clients, seconds)
    out = status_reads(svc, clients, seconds)
    for kind in out:
        out[kind]["client"] = "httpx"
    return out


def fill(svc: Service, target: int, batch: int) -> None:
    """Create tenants through the API in bursts of ``batch`` until ``target`` exist."""
    while len(svc._ids) + 1 < target:
        n = min(batch, target - len(svc._ids) - 1)
        r = burst(svc, n)
        log(f"  filled {len(svc._ids) + 1} tenants ({r['tenants_per_minute']:.0f}/min)")


def extra_history(svc: Service, runs: int, batch: int) -> None:
    """Real run history: re-activate existing tenants in bursts until ``runs`` runs exist."""
    ids = [i for i in svc._ids]
    while svc.run_count() < runs:
        chosen = random.sample(ids, min(batch, len(ids)))

        async def post_all(chosen: list[str] = chosen) -> None:
            async with svc.async_client(len(chosen), timeout=600) as ac:
                await asyncio.gather(
                    *(ac.post(f"/api/tenants/{i}/activate", json={}) for i in chosen)
                )

        asyncio.run(post_all())
        with svc.client() as c:
            wait_all_active(c, chosen, timeout=1800)
        log(f"  run history: {svc.run_count()} runs")


# ---------------------------------------------------------------- floor
def floor(svc: Service, n: int) -> list[float]:
    """The same tenant work with no orchestration: the step bodies called one after another
    (CREATE DATABASE, every module's Alembic migrations, seed incl. the password hash,
    the reset token, cache keys, verification)."""
    from tenant_pipelines import assets, registry

    settings = svc.settings()
    out = []
    for _ in range(n):
        tenant_id = new_id(svc)
        req = registry.TenantRequest(**tenant_body(tenant_id))
        t0 = time.perf_counter()
        registry.create_tenant(settings, req, "bench")
        tenant = registry.get_tenant(settings, tenant_id)
        for body in (
            assets.validate,
            assets.database,
            assets.migrations,
            assets.seeded,
            assets.credentials,
            assets.cached,
            assets.verified,
        ):
            body(settings, tenant)
        out.append(time.perf_counter() - t0)
        # Leave it active like the others, so it counts as an existing tenant.
        registry.transition(
            settings, tenant_id, "active", allowed_from=("requested",), reason=None, actor="bench"
        )
    return out


# ---------------------------------------------------------------- the suite
@contextlib.contextmanager
def service(launcher: str, keep: bool) -> Iterator[Service]:
    svc = Service(launcher)
    try:
        log(f"starting tenantctl serve ({launcher} launcher) on {svc.url}")
        yield svc.start()
    finally:
        svc.stop(keep=keep)


def timed(what: str, fn: Callable[[], Any]) -> Any:
    log(what + " ...")
    t0 = time.monotonic()
    out = fn()
    log(f"{what}: done in {time.monotonic() - t0:.1f}s")
    if _partial is not None:  # a long run that is stopped early still leaves its numbers
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "partial.json").write_text(json.dumps(_partial, indent=2, default=str))
    return out


_partial: dict[str, Any] | None = None


def run_suite(a: argparse.Namespace) -> dict[str, Any]:
    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, cwd=REPO, check=False
        )
        .stdout.decode()
        .strip()
    )
    dirty = bool(
        subprocess.run(
            ["git", "status", "--porcelain", "--", "tenant_pipelines", "dagster.yaml", "deploy"],
            capture_output=True,
            cwd=REPO,
            check=False,
        ).stdout.strip()
    )
    res: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit + ("-dirty" if dirty else ""),
        "machine": {
            "nproc": os.cpu_count(),
            "mem_total_mb": _kb("/proc/meminfo", "MemTotal") // 1024,
            "loadavg_start": loadavg(),
        },
        "args": vars(a),
    }
    global _partial
    _partial = res
    if a.compare > 0:
        with service("default", a.keep) as svc:
            lat = timed(
                f"default launcher: {a.compare} sequential", lambda: sequential(svc, a.compare)
            )
            res["default_launcher"] = {"create_active_s": summary(lat), "loadavg": loadavg()}
    with service("warm", a.keep) as svc:
        fl = timed(f"floor x{a.floor}", lambda: floor(svc, a.floor))
        res["floor_s"] = summary(fl)
        res["memory_idle"] = memory(svc.proc.pid if svc.proc else 0)
        growth: list[dict[str, Any]] = []
        points = sorted(a.growth)
        # Point 1: the main sequential measurement.
        fill(svc, points[0], a.batch)
        lat = timed(f"{a.sequential} sequential", lambda: sequential(svc, a.sequential))
        res["create_active_s"] = summary(lat)
        res["create_active_s"]["ratio_p50_floor"] = pct(lat, 50) / pct(fl, 50)
        res["create_active_s"]["loadavg"] = loadavg()
        reads = timed("status reads", lambda: reads_of(svc, a.clients, a.growth_seconds))
        growth.append(
            {
                "tenants": len(svc._ids) + 1,
                "runs": svc.run_count(),
                "create_active_s": summary(lat),
                "reads_ms": reads,
            }
        )
        rv = timed(f"re-verify x{a.reverify}", lambda: reverify(svc, svc._ids[-a.reverify :]))
        res["reverify_s"] = summary(rv)
        res["memory_idle"] = memory(svc.proc.pid if svc.proc else 0)
        with MemorySampler(svc.proc.pid if svc.proc else 0) as sampler:
            res["burst"] = timed(f"burst of {a.burst}", lambda: burst(svc, a.burst))
        res["burst"]["loadavg"] = loadavg()
        res["memory_burst_peak"] = sampler.peak
        res["burst"]["peak_pg_connections"] = sampler.peak_connections
        for point in points[1:]:
            timed(f"fill to {point}", functools.partial(fill, svc, point, a.batch))
            if point == points[-1] and a.history_runs:
                timed("run history", lambda: extra_history(svc, a.history_runs, a.batch))
            lat = timed(
                f"{a.growth_sequential} sequential", lambda: sequential(svc, a.growth_sequential)
            )
            secs = a.read_seconds if point == points[-1] else a.growth_seconds
            reads = timed("status reads", functools.partial(reads_of, svc, a.clients, secs))
            growth.append(
                {
                    "tenants": len(svc._ids) + 1,
                    "runs": svc.run_count(),
                    "create_active_s": summary(lat),
                    "reads_ms": reads,
                }
            )
        res["growth"] = growth
        res["status_reads"] = growth[-1]
        res["memory_idle_end"] = memory(svc.proc.pid if svc.proc else 0)
    res["machine"]["loadavg_end"] = loadavg()
    res["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return res


def table(res: dict[str, Any]) -> str:
    peak = res["memory_burst_peak"]
    f = res["floor_s"]["p50"]
    rows = [("measure", "value")]
    rows.append(("floor (straight script) p50", f"{f * 1000:.0f} ms"))
    ca = res["create_active_s"]
    rows.append(
        ("create->active p50/p95/max", f"{ca['p50']:.2f} / {ca['p95']:.2f} / {ca['max']:.2f} s")
    )
    rows.append(("ratio p50 / floor", f"{ca['ratio_p50_floor']:.1f}x"))
    if "default_launcher" in res:
        d = res["default_launcher"]["create_active_s"]
        rows.append(("  default launcher p50/p95", f"{d['p50']:.2f} / {d['p95']:.2f} s"))
    b = res["burst"]
    rows.append(
        (
            f"burst {b['n']}: all active",
            f"{b['all_active_s']:.1f} s ({b['tenants_per_minute']:.0f}/min), "
            f"peak {b.get('peak_pg_connections', '?')} PostgreSQL connections",
        )
    )
    rows.append(("re-verify p50", f"{res['reverify_s']['p50']:.2f} s"))
    sr = res["status_reads"]
    for kind in ("provisioning", "list"):
        r = sr["reads_ms"][kind]
        rows.append(
            (
                f"reads {kind} @{sr['tenants']} tenants/{sr['runs']} runs",
                f"p50 {r['p50']:.0f} ms p99 {r['p99']:.0f} ms, "
                f"{r['errors']} errors, {r['rps']:.0f}/s",
            )
        )
    for g in res["growth"]:
        rows.append(
            (
                f"growth @{g['tenants']} tenants",
                f"create p50 {g['create_active_s']['p50']:.2f} s; reads p99 "
                f"{g['reads_ms']['provisioning']['p99']:.0f}/{g['reads_ms']['list']['p99']:.0f} ms",
            )
        )
    rows.append(
        (
            "memory idle (PSS / RSS sum)",
            f"{res['memory_idle']['pss_mb']:.0f} / {res['memory_idle']['rss_mb']:.0f} MB",
        )
    )
    rows.append(
        (
            "memory burst peak (PSS / RSS)",
            f"{peak['pss_mb']:.0f} / {peak['rss_mb']:.0f} MB",
        )
    )
    rows.append(
        (
            "load average start / end",
            f"{res['machine']['loadavg_start']} / {res['machine']['loadavg_end']}",
        )
    )
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a couple of minutes)")
    p.add_argument("--floor", type=int, default=5, help="tenants for the floor script")
    p.add_argument("--sequential", type=int, default=20)
    p.add_argument(
        "--compare",
        type=int,
        default=10,
        help="sequential tenants with Dagster's default launcher (0: skip)",
    )
    p.add_argument("--burst", type=int, default=100)
    p.add_argument("--reverify", type=int, default=10)
    p.add_argument(
        "--growth",
        type=int,
        nargs="+",
        default=[10, 100, 1000],
        help="existing-tenant counts; the last is the status-read point",
    )
    p.add_argument("--growth-sequential", type=int, default=5)
    p.add_argument("--growth-seconds", type=float, default=10)
    p.add_argument("--read-seconds", type=float, default=20)
    p.add_argument(
        "--history-runs",
        type=int,
        default=3000,
        help="runs in history before the last point (re-activations in bursts)",
    )
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--batch", type=int, default=100, help="burst size when filling")
    p.add_argument("--keep", action="store_true", help="keep databases and folders")
    a = p.parse_args(argv)
    if a.smoke:
        a.floor, a.sequential, a.compare, a.burst, a.reverify = 2, 3, 2, 5, 2
        a.growth, a.growth_sequential, a.growth_seconds, a.read_seconds = [3, 12], 2, 2, 3
        a.history_runs, a.clients, a.batch = 0, 5, 10
    res = run_suite(a)
    RESULTS.mkdir(exist_ok=True)
    name = ("smoke-" if a.smoke else "") + time.strftime("%Y%m%dT%H%M%S") + ".json"
    (RESULTS / name).write_text(json.dumps(res, indent=2, default=str))
    print(table(res))
    print(f"\nwritten to {RESULTS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
