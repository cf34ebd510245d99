"""A Dagster run launcher that starts run workers from a warm multiprocessing *forkserver*.

Why: with Dagster's ``DefaultRunLauncher`` every run is a fresh ``spawn`` of the code server
that imports Dagster, SQLAlchemy, the storage modules and our code before it executes the
first step (about 1.1-2.6 s on a 2-core machine), and the daemon's ``launch_run`` blocks until
that child reports back, so a burst is launched one run every ~1.7 s. Here a forkserver
imports all of that ONCE (``preload_modules``) and every run worker is a ``fork`` of it
(about 5 ms); ``launch_run`` returns as soon as the child exists.

The worker body is exactly what ``dagster api execute_run`` runs
(``dagster._cli.api._execute_run_command_body`` -> ``core_execute_run``), so the event log,
step handling, retries and run status are Dagster's own.

Configured in ``dagster.yaml``::

    run_launcher:
      module: tenant_pipelines.launcher
      class: ForkserverRunLauncher
      config:
        preload_modules: [tenant_pipelines.warm_preload]

Start the daemon with ``python -m tenant_pipelines.launcher run -w workspace.yaml`` (a drop-in
for ``dagster-daemon``) so that the forkserver is warm before the first run.

Limits (see docs/performance.md):

* Single host: ``terminate`` and the cross-process health check find the worker through the
  ``pid``/``host``/``pstart`` tags, so the webserver and the daemon must share a PID namespace.
* The forkserver snapshots the environment, ``sys.executable`` and the preloaded modules when it
  starts: a deploy (or a change of ``TP_*`` settings) needs a daemon restart, which
  ``tenantctl serve`` does anyway.
* It relies on two private pieces pinned with Dagster 1.13.27 and CPython 3.11:
  ``_execute_run_command_body`` and ``popen_forkserver.Popen._launch`` (copied below).
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from multiprocessing import context as mp_context
from multiprocessing import forkserver as mp_forkserver
from multiprocessing import popen_forkserver as mp_popen_forkserver
from multiprocessing import reduction as mp_reduction
from multiprocessing import spawn as mp_spawn
from multiprocessing import util as mp_util
from typing import Any, Self

from dagster import Array, DagsterInstance, Field, Noneable, StringSource
from dagster._config import UserConfigSchema
from dagster._core.launcher.base import (
    CheckRunHealthResult,
    LaunchRunContext,
    RunLauncher,
    WorkerStatus,
)
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.storage.runs.sql_run_storage import SqlRunStorage
from dagster._serdes import ConfigurableClass, ConfigurableClassData, serialize_value

PID_TAG = "tenant_pipelines/worker_pid"
HOST_TAG = "tenant_pipelines/worker_host"
# The worker's start time from /proc: a pid alone may have been reused by another process.
PSTART_TAG = "tenant_pipelines/worker_pstart"

DEFAULT_PRELOAD: tuple[str, ...] = ("tenant_pipelines.warm_preload",)

log = logging.getLogger("tenant_pipelines.launcher")


def proc_start_time(pid: int) -> str | None:
    """Field 22 (``starttime``) of ``/proc/<pid>/stat``, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            # The command name (field 2) may contain spaces and parentheses: split after it.
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _same_live_process(pid: int, pstart: str | None) -> bool:
    current = proc_start_time(pid)
    return current is not None and (not pstart or current == pstart)


def pool_storage(instance: DagsterInstance, max_overflow: int) -> None:
    """Give the instance's storage a connection pool, as ``dagster-webserver`` does.

    dagster-postgres defaults to ``NullPool``: a new PostgreSQL connection for every event a
    run writes and every query the daemon makes, about 50 per provisioning run. Measured with
    the same job on the same instance: 1.61 s -> 0.80 s per run (docs/performance.md).
    ``statement_timeout=0`` keeps PostgreSQL's default (none): a slow event write must not fail
    a run. SQLite storage ignores this.
    """
    instance.optimize_for_webserver(
        statement_timeout=0, pool_recycle=3600, max_overflow=max_overflow
    )
    cache_schema_checks(instance)


def cache_schema_checks(instance: DagsterInstance) -> None:
    """Make the run storage remember that its ``runs`` table has the run-stats columns.

    Dagster 1.13's ``SqlRunStorage.has_run_stats_index_cols`` reflects the table's columns (a
    catalog query) on every ``get_run_records`` and every run event, uncached. py-spy over a
    burst of 100 provisioning runs put ~10% of each run worker's CPU there, and as much again
    in PostgreSQL. A schema migration adds those columns and nothing removes them: once seen,
    they stay. Checked once here, per process.
    """
    storage = instance.run_storage
    if isinstance(storage, SqlRunStorage) and storage.has_run_stats_index_cols():
        storage.has_run_stats_index_cols = lambda: True  # type: ignore[method-assign]


# ------------------------------------------------------------------ the worker (forked child)
def _run_worker_main(run_id: str, serialized_instance_ref: str) -> None:
    """Body of a run worker: the same as ``dagster api execute_run``."""
    from dagster._cli.api import _execute_run_command_body
    from dagster._cli.utils import get_instance_for_cli
    from dagster._core.instance import InstanceRef
    from dagster._serdes import deserialize_value
    from dagster._utils.interrupts import capture_interrupts, setup_interrupt_handlers

    # Own session and process group: a Ctrl-C or SIGTERM sent to the daemon's group must not
    # kill runs in flight (the code server's workers behave the same way).
    os.setsid()
    # As every Dagster CLI entry point: SIGTERM becomes KeyboardInterrupt (run ends FAILURE
    # rather than vanishing). SIGINT, which terminate() sends, is captured and raised inside
    # the step as DagsterExecutionInterruptedError, so the run ends CANCELED.
    setup_interrupt_handlers()
    with capture_interrupts():
        ref = deserialize_value(serialized_instance_ref, InstanceRef)
        # A fresh instance, hence fresh database engines: nothing is inherited from the
        # forkserver, which only imported modules.
        with get_instance_for_cli(instance_ref=ref) as instance:
            pool_storage(instance, max_overflow=4)
            code = _execute_run_command_body(
                run_id, instance, lambda _event: None, set_exit_code_on_failure=False
            )
    sys.exit(code)


# ------------------------------------------------------------------ forkserver plumbing
class _NoMainForkserverPopen(mp_popen_forkserver.Popen):
    """``popen_forkserver.Popen`` that does not make the child re-run the parent's ``__main__``.

    Every multiprocessing child re-imports the parent's main script as ``__mp_main__``. In the
    daemon that is the ``dagster-daemon`` console script (click, the daemon CLI): ~0.45 s per
    run that no preload can avoid, because CPython 3.11's forkserver filters the preparation
    data on the key ``main_path`` while the key is ``init_main_from_path``. Our target lives in
    an importable module, so the child needs no ``__main__``. Copy of CPython 3.11's
    ``_launch`` with only the two ``pop`` calls added: recheck on every Python upgrade.
    """

    def _launch(self, process_obj: Any) -> None:
        prep_data = mp_spawn.get_preparation_data(process_obj._name)
        prep_data.pop("init_main_from_path", None)
        prep_data.pop("init_main_from_name", None)
        buf = io.BytesIO()
        mp_context.set_spawning_popen(self)
        try:
            mp_reduction.dump(prep_data, buf)
            mp_reduction.dump(process_obj, buf)
        finally:
            mp_context.set_spawning_popen(None)
        self.sentinel, w = mp_forkserver.connect_to_new_process(self._fds)  # type: ignore[attr-defined]
        parent_w = os.dup(w)
        self.finalizer = mp_util.Finalize(
            self,
            mp_util.close_fds,  # type: ignore[attr-defined]
            (parent_w, self.sentinel),
        )
        with open(w, "wb", closefd=True) as fh:
            fh.write(buf.getbuffer())
        self.pid = mp_forkserver.read_signed(self.sentinel)


class _WarmProcess(mp_context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj: Any) -> _NoMainForkserverPopen:
        return _NoMainForkserverPopen(process_obj)


def start_forkserver(preload_modules: Sequence[str]) -> None:
    """Start the (process-wide) forkserver now, importing ``preload_modules`` once.

    The forkserver is exec'd as a fresh interpreter, so it inherits none of the caller's
    threads, gRPC channels or database connections: only what the preload imports. Preload
    modules must therefore only import (no engines, threads or environment-dependent state).
    """
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(preload_modules))
    mp_forkserver.ensure_running()


# ------------------------------------------------------------------ the launcher
class ForkserverRunLauncher(RunLauncher, ConfigurableClass):
    """Launches each run in a worker forked from a warm forkserver (single host)."""

    def __init__(
        self,
        inst_data: ConfigurableClassData | None = None,
        preload_modules: Sequence[str] | None = None,
        reap_interval_seconds: float = 0.5,
    ) -> None:
        self._inst_data = inst_data
        self.preload_modules: tuple[str, ...] = tuple(preload_modules or DEFAULT_PRELOAD)
        self._reap_interval = reap_interval_seconds
        self._lock = threading.Lock()
        # Workers launched by THIS process (the daemon): exact exit codes for health checks
        # and the reaper. Other processes (webserver) only have the run tags.
        self._procs: dict[str, multiprocessing.process.BaseProcess] = {}
        self._reaper: threading.Thread | None = None
        self._stop = threading.Event()
        super().__init__()  # type: ignore[no-untyped-call]

    # -- ConfigurableClass
    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict[str, Field]:
        return {
            "preload_modules": Field(
                Noneable(Array(StringSource)),
                is_required=False,
                description="Modules the forkserver imports once (import-only modules).",
            ),
            "reap_interval_seconds": Field(float, is_required=False, default_value=0.5),
        }

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]
    ) -> Self:
        return cls(inst_data=inst_data, **config_value)

    # -- forkserver
    def _ensure_started(self) -> None:
        with self._lock:
            if self._reaper is None:
                start_forkserver(self.preload_modules)
                self._reaper = threading.Thread(
                    target=self._reap_loop, name="forkserver-launcher-reaper", daemon=True
                )
                self._reaper.start()

    # -- RunLauncher
    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        self._ensure_started()
        proc = _WarmProcess(
            target=_run_worker_main,
            args=(run.run_id, serialize_value(self._instance.get_ref())),
            name=f"dagster-run-{run.run_id[:8]}",
        )
        proc.start()
        # multiprocessing joins its children at exit: the daemon must be able to stop (or
        # restart) while runs are in flight, as with the code server's workers.
        multiprocessing.process._children.discard(proc)  # type: ignore[attr-defined]
        with self._lock:
            self._procs[run.run_id] = proc
        pid = proc.pid
        assert pid is not None
        self._instance.add_run_tags(
            run.run_id,
            {
                PID_TAG: str(pid),
                HOST_TAG: socket.gethostname(),
                PSTART_TAG: proc_start_time(pid) or "",
            },
        )

    def terminate(self, run_id: str) -> bool:
        # Called from the webserver (GraphQL terminateRun), not the daemon: use the run tags.
        run = self._instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            return False
        self._instance.report_run_canceling(run)
        pid = run.tags.get(PID_TAG)
        if not pid or run.tags.get(HOST_TAG) != socket.gethostname():
            self._instance.report_engine_event(
                "No local run worker for this run: cannot terminate it from this host.",
                run,
                cls=self.__class__,
            )
            return False
        if not _same_live_process(int(pid), run.tags.get(PSTART_TAG)):
            return False
        # SIGINT, the signal the code server's own termination path sends (send_interrupt):
        # captured by capture_interrupts() and raised in the step -> run CANCELED.
        os.kill(int(pid), signal.SIGINT)
        return True

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        with self._lock:
            proc = self._procs.get(run.run_id)
            code = proc.exitcode if proc is not None else None
        if proc is not None:
            if code is None:
                return CheckRunHealthResult(WorkerStatus.RUNNING, run_worker_id=str(proc.pid))
            if code == 0:
                return CheckRunHealthResult(WorkerStatus.SUCCESS)
            return CheckRunHealthResult(WorkerStatus.FAILED, f"run worker exit code {code}")
        # Not launched by this process (or the daemon restarted): pid + start time from tags.
        pid = run.tags.get(PID_TAG)
        if not pid:
            return CheckRunHealthResult(WorkerStatus.NOT_FOUND, "run has no worker pid tag")
        fresh = self._instance.get_run_by_id(run.run_id)
        if fresh is not None and fresh.is_finished:
            return CheckRunHealthResult(WorkerStatus.SUCCESS, f"run is {fresh.status.value}")
        if run.tags.get(HOST_TAG) != socket.gethostname():
            return CheckRunHealthResult(WorkerStatus.UNKNOWN, "run worker is on another host")
        if _same_live_process(int(pid), run.tags.get(PSTART_TAG)):
            return CheckRunHealthResult(WorkerStatus.RUNNING, run_worker_id=pid)
        return CheckRunHealthResult(WorkerStatus.FAILED, f"run worker pid {pid} is gone")

    def _reap_loop(self) -> None:
        """Mark FAILURE the runs whose worker died before finishing them (SIGKILL, OOM).

        The code server does the same for its workers (``_check_for_orphaned_runs``); without
        it a killed worker would only be noticed by run monitoring, seconds later.
        """
        from dagster._utils import get_run_crash_explanation

        while not self._stop.wait(self._reap_interval):
            with self._lock:
                done = {rid: p for rid, p in self._procs.items() if not p.is_alive()}
                for rid in done:
                    del self._procs[rid]
            for rid, proc in done.items():
                try:
                    code = proc.exitcode
                    proc.close()  # releases the sentinel file descriptor
                    run = self._instance.get_run_by_id(rid)
                    if run is not None and not run.is_finished:
                        self._instance.report_engine_event(
                            get_run_crash_explanation(f"Run worker for run {rid}", code or 0),
                            run,
                            cls=self.__class__,
                        )
                        self._instance.report_run_failed(run)
                except Exception:
                    log.exception("could not reap the worker of run %s", rid)

    def dispose(self) -> None:
        self._stop.set()


class FloatIntervalQueuedRunCoordinator(QueuedRunCoordinator):
    """``QueuedRunCoordinator`` whose ``dequeue_interval_seconds`` may be below one second.

    The stock schema is an integer (1 s at least, or 0, which busy-polls a whole core). With
    :func:`use_exact_dequeue_interval` (the daemon started by :func:`main`), 0.2 s gives a
    mean queue wait of ~0.1 s instead of ~0.5 s, for ~1-2 % of a core at idle.
    """

    def register_instance(self, instance: DagsterInstance) -> None:
        """Also pool the instance's storage: the daemon's dequeue loop (every 0.5 s) otherwise
        opens several PostgreSQL connections per tick. This is the one hook of ours that the
        daemon's instance passes through."""
        super().register_instance(instance)
        pool_storage(instance, max_overflow=4)

    @classmethod
    def config_type(cls) -> UserConfigSchema:
        schema = dict(super().config_type())  # type: ignore[arg-type]
        schema["dequeue_interval_seconds"] = Field(float, is_required=False)
        return schema

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
    ) -> Self:
        values = dict(config_value)
        interval = values.pop("dequeue_interval_seconds", None)
        coordinator = super().from_config_value(inst_data, values)  # type: ignore[arg-type]
        if interval is not None:
            coordinator._dequeue_interval_seconds = interval
        return coordinator


def _dequeue_loop(
    self: Any, workspace_process_context: Any, shutdown_event: threading.Event
) -> Iterator[Any]:
    """``IntervalDaemon.core_loop`` of Dagster 1.13.27 that waits out exactly the rest of the
    interval. The stock loop waits in fixed 0.5 s slices, so an interval below 0.5 s is never
    honoured and every queued run waited 0.25 s on average before its launch.
    """
    from dagster._daemon.daemon import SpanMarker
    from dagster._utils.error import serializable_error_info_from_exc_info

    while True:
        start = time.monotonic()
        yield SpanMarker.START_SPAN
        try:
            yield from self.run_iteration(workspace_process_context)
        except Exception:
            error_info = serializable_error_info_from_exc_info(sys.exc_info())
            self._logger.error("Caught error:\n%s", error_info)
            yield error_info
        yield SpanMarker.END_SPAN
        remaining = self.interval_seconds - (time.monotonic() - start)
        if remaining > 0:
            shutdown_event.wait(remaining)
        yield None


def use_exact_dequeue_interval() -> None:
    """Make this process's queued-run daemon honour ``dequeue_interval_seconds`` below 0.5 s."""
    from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import (
        QueuedRunCoordinatorDaemon,
    )

    QueuedRunCoordinatorDaemon.core_loop = _dequeue_loop  # type: ignore[method-assign,assignment]


def main(argv: Sequence[str] | None = None) -> int:
    """``dagster-daemon`` with the run-worker forkserver started first.

    The first run then finds the forkserver warm instead of paying ~1 s of imports. Arguments
    are those of ``dagster-daemon`` (``run -w workspace.yaml``).
    """
    from dagster import DagsterInstance
    from dagster._daemon.cli import main as daemon_main

    use_exact_dequeue_interval()

    with DagsterInstance.get() as instance:
        launcher = instance.run_launcher
        if isinstance(launcher, ForkserverRunLauncher):
            start_forkserver(launcher.preload_modules)
    sys.argv = ["dagster-daemon", *(sys.argv[1:] if argv is None else argv)]
    daemon_main()
    return 0


if __name__ == "__main__":
    # Import through the package so pickled targets name ``tenant_pipelines.launcher``, not
    # ``__main__`` (the forked child has no ``__main__`` of ours).
    from tenant_pipelines.launcher import main as _main

    sys.exit(_main())
