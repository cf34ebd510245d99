"""The API's in-memory copy of the tenant catalog, for the status reads.

``GET /api/tenants`` and ``GET /api/tenants/{id}/provisioning`` are what automation polls.
Served from the database they cost a thread hop and two or three queries each, about
250 reads a second on this 2-core machine. Here a page is a slice of a sorted list of
pre-serialised tenants, served on the event loop.

Freshness: a thread polls ``count(*), max(updated_at)`` every ``POLL_S`` and fetches the rows
changed since (with an overlap for transactions that committed late), or everything when
the count says rows came or went another way; a full reload runs every ``FULL_RELOAD_S``
regardless. Every change of a tenant made by our code sets ``updated_at``, so another
process's change is visible here within about ``POLL_S``; this process's own writes call
:meth:`ReadModel.refresh` before they answer, so a client reads its own writes.

A provisioning answer is kept per tenant while the tenant row is unchanged and every run in
it has settled (finished more than ``runs.SETTLED_AFTER_S`` ago); one with a run in flight
is kept for ``POLL_S`` at most, as fresh as the rest of this model. A second thread computes
the answers of tenants with no run in flight ahead of time, after a start or a change, and
once more when their last run has settled (readers get the previous answer meanwhile, which
can only lag on that run's final events), so such reads never wait for Dagster's run storage.
"""

import datetime as dt
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import sqlalchemy as sa

from . import registry
from .settings import Settings
from .telemetry import get_logger

POLL_S = 0.2
FULL_RELOAD_S = 60.0
# Rows committed late carry an updated_at a little older than the newest one already seen.
OVERLAP = dt.timedelta(seconds=5)
PROVISIONING_KEPT = 20_000
# Provisioning answers computed ahead between two looks at the stop flag.
WARM_BATCH = 20
IN_FLIGHT = ("requested", "provisioning")
FINAL_RUN_STATUSES = ("SUCCESS", "FAILURE", "CANCELED")


def dumps(value: Any) -> bytes:
    """JSON exactly as Starlette's JSONResponse renders it."""
    return json.dumps(
        value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")


class Kept(NamedTuple):
    """A computed provisioning answer."""

    key: tuple[Any, ...]  # the tenant row it was computed for (_key)
    body: bytes
    until: float  # time.time() after which it must be read again
    began: float  # time.time() when its reading began
    runs_final: bool  # every run in it had finished


@dataclass(frozen=True)
class Snapshot:
    """One consistent state of the catalog; replaced, never changed, after it is built."""

    tenants: dict[str, registry.Tenant]
    encoded: dict[str, bytes]
    ids: list[str]  # sorted, as list_tenants orders them
    by_status: dict[str, list[str]] = field(default_factory=dict)

    def ids_with(self, status: str | None) -> list[str]:
        if status is None:
            return self.ids
        found = self.by_status.get(status)
        if found is None:
            found = [i for i in self.ids if self.tenants[i].status == status]
            self.by_status[status] = found  # a cache of this snapshot: same answer every time
        return found


class ReadModel:
    """The catalog in memory, kept current by a polling thread (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        encode: Callable[[registry.Tenant], dict[str, Any]],
        provision_reader: Callable[[str], bytes] | None = None,
    ):
        self.settings, self.encode = settings, encode
        # One connection of its own (made at the first refresh): polling must not queue
        # behind busy request threads.
        self._engine: sa.Engine | None = None
        # Computes (and keeps, through keep_provisioning) a tenant's provisioning answer: the
        # poller warms settled tenants with it, so a first read is not a database read.
        self.provision_reader = provision_reader
        self.snapshot: Snapshot | None = None
        self._signature: tuple[int, dt.datetime | None] | None = None
        self._since: dt.datetime | None = None
        self._full_at = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Oldest first; bounded so that memory does not grow with every tenant.
        self._provisioning: OrderedDict[str, Kept] = OrderedDict()

    # --- lifecycle
    def start(self) -> None:
        """Load the catalog, then keep it current in a daemon thread."""
        self.refresh()
        self._threads = [
            threading.Thread(target=self._loop, name="tp-readmodel", daemon=True),
            threading.Thread(target=self._warm_loop, name="tp-readmodel-warm", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._engine is not None:
            self._engine.dispose()

    def _loop(self) -> None:
        log = get_logger()
        while not self._stop.wait(POLL_S):
            try:
                self.refresh()
            except Exception as exc:  # the database may be away; serve what we have
                log.warning("read model refresh failed: %s", type(exc).__name__)

    def _warm_loop(self) -> None:
        # Its own thread: warming after a start takes seconds, refreshing must not wait.
        log = get_logger()
        while not self._stop.is_set():
            try:
                done = self.warm(WARM_BATCH)
            except Exception as exc:
                log.warning("read model warm-up failed: %s", type(exc).__name__)
                done = 0
            if not done:
                self._stop.wait(POLL_S)

    def warm(self, most: int) -> int:
        """Compute up to ``most`` provisioning answers that are missing or out of date, for
        tenants with no run in flight (those are read on demand); returns how many."""
        snap = self.snapshot
        if snap is None or self.provision_reader is None:
            return 0
        done = 0
        for tenant_id in snap.ids:
            if done >= most or self._stop.is_set():
                break
            tenant = snap.tenants[tenant_id]
            if tenant.status in IN_FLIGHT:
                continue
            kept = self._provisioning.get(tenant_id)
            if kept is not None and kept.key == _key(tenant) and time.time() <= kept.until:
                continue
            self.provision_reader(tenant_id)
            done += 1
        return done

    # --- keeping current
    def refresh(self) -> None:
        """Bring the snapshot up to date with the database (cheap when nothing changed)."""
        with self._lock:
            if not self._refresh(full=False):
                # Rows came or went without a newer updated_at: load everything.
                self._refresh(full=True)

    def _refresh(self, full: bool) -> bool:
        t = registry.tenants
        full = full or self.snapshot is None or time.monotonic() - self._full_at > FULL_RELOAD_S
        if self._engine is None:
            self._engine = registry.new_engine(self.settings, pool_size=1, max_overflow=0)
        with self._engine.connect() as conn:
            count, newest = conn.execute(
                sa.select(sa.func.count(), sa.func.max(t.c.updated_at))
            ).one()
            signature = (int(count), newest)
            if not full and signature == self._signature:
                return True
            query = sa.select(t)
            if not full and self._since is not None:
                query = query.where(t.c.updated_at >= self._since - OVERLAP)
            rows = conn.execute(query).mappings().all()
        changed = [registry.Tenant.from_row(r) for r in rows]
        old = self.snapshot
        if full or old is None:
            tenants: dict[str, registry.Tenant] = {}
            encoded: dict[str, bytes] = {}
            ids: list[str] = []
        else:
            tenants, encoded, ids = dict(old.tenants), dict(old.encoded), old.ids
        added = [x.id for x in changed if x.id not in tenants]
        # A full reload finds most tenants unchanged: their encoding is reused.
        before, before_encoded = (old.tenants, old.encoded) if old else ({}, {})
        for x in changed:
            tenants[x.id] = x
            same = before.get(x.id) == x
            encoded[x.id] = before_encoded[x.id] if same else dumps(self.encode(x))
        if added:
            ids = sorted([*ids, *added])  # timsort: linear on a sorted list plus a few
        if not full and len(tenants) != signature[0]:
            return False
        if full:
            self._full_at = time.monotonic()
        self.snapshot = Snapshot(tenants, encoded, ids)
        self._signature, self._since = signature, newest
        return True

    # --- reads
    def page(self, status: str | None, limit: int, offset: int) -> bytes | None:
        """``GET /api/tenants``'s body, or None before the first load."""
        snap = self.snapshot
        if snap is None:
            return None
        ids = snap.ids_with(status)
        items = b",".join([snap.encoded[i] for i in ids[offset : offset + limit]])
        tail = b'],"total":%d,"limit":%d,"offset":%d}' % (len(ids), limit, offset)
        return b'{"items":[' + items + tail

    def tenant(self, tenant_id: str) -> registry.Tenant | None:
        snap = self.snapshot
        return snap.tenants.get(tenant_id) if snap else None

    def provisioning(self, tenant_id: str) -> bytes | None:
        """A kept provisioning answer for the tenant, if still valid."""
        tenant = self.tenant(tenant_id)
        kept = self._provisioning.get(tenant_id)
        if tenant is None or kept is None or kept.key != _key(tenant):
            return None
        if time.time() > kept.until and (tenant.status in IN_FLIGHT or not kept.runs_final):
            # A run was in flight (the tenant may already be active: the last step marks it
            # before the run ends): read it again, as fresh as the rest of this model.
            return None
        # Past its time with every run finished: only the last run's final events can still
        # arrive; the warm-up thread reads it again, readers get this one meanwhile.
        return kept.body

    def keep_provisioning(self, tenant: registry.Tenant, body: dict[str, Any], now: float) -> bytes:
        """Encode a provisioning answer and keep it: until the tenant row changes if every run
        in it has settled, else for ``POLL_S`` (the freshness of everything else here)."""
        encoded = dumps(body)
        current = self.tenant(tenant.id)
        if current is not None and _key(current) == _key(tenant):
            until = _kept_until(tenant, body, now)
            with self._lock:
                kept = self._provisioning.get(tenant.id)
                # Two readings can overlap (a request and the warm-up): the later one wins.
                if kept is None or kept.key != _key(tenant) or kept.began <= now:
                    final = all(r.get("status") in FINAL_RUN_STATUSES for r in body["runs"])
                    self._provisioning[tenant.id] = Kept(_key(tenant), encoded, until, now, final)
                while len(self._provisioning) > PROVISIONING_KEPT:
                    self._provisioning.popitem(last=False)
        return encoded


def _key(tenant: registry.Tenant) -> tuple[Any, ...]:
    return (tenant.updated_at, tenant.status, tenant.run_id)


def _kept_until(tenant: registry.Tenant, body: dict[str, Any], now: float) -> float:
    """When a provisioning answer must be read again (``time.time()``).

    Every run settled: never, until the tenant row changes. A run in flight, or a tenant whose
    status says one is coming: after ``POLL_S``. Every run finished but the last one not
    settled yet: once, when it has settled; its reader gets this answer meanwhile (see
    :meth:`ReadModel.provisioning`). Reading it every ``POLL_S`` instead kept the warm-up
    thread busy for ten seconds after each burst, and readers on the event loop waited for
    the GIL behind it.
    """
    from .runs import SETTLED_AFTER_S

    last_end = 0.0
    for run in body["runs"]:
        ended = run.get("end")
        if run.get("status") not in FINAL_RUN_STATUSES or not ended:
            return now + POLL_S
        last_end = max(last_end, dt.datetime.fromisoformat(ended).timestamp())
    if now - last_end > SETTLED_AFTER_S:
        return float("inf")
    if tenant.status in IN_FLIGHT:
        return now + POLL_S
    return last_end + SETTLED_AFTER_S + POLL_S
