"""The one code server of ``tenantctl serve``, shared by the HTTP service and the daemon.

Left to themselves, the service's workspace context and the daemon each start a managed
``dagster api grpc`` for our ``python_module`` location (~140 MB PSS each), and the daemon
replaces its own every 60 s (``RELOAD_WORKSPACE_INTERVAL``), the old one living up to 20 s
longer: two or three code servers at idle. ``tenantctl serve`` instead starts one on a Unix
socket in a private (0700) folder, and both load it as a ``grpc_server`` location: the daemon
through the workspace file written next to the socket, the service through
``TP_CODE_SERVER_SOCKET`` (read by ``runs.workspace_target``).

Lifetime: the server runs in its own session, so a Ctrl-C in the terminal does not kill it
under a service that is still shutting down; ``stop`` ends it. It also gets Dagster's
heartbeat: if ``tenantctl serve`` is killed outright, it exits by itself after
``HEARTBEAT_TIMEOUT_S``.

If it dies (OOM killer, a crash), the supervisor logs an error and restarts it on the same
socket: the UI's location watcher and the daemon's gRPC clients reconnect by themselves. If a
restart does not come up (broken code), it gives up and calls ``on_give_up``: ``tenantctl
serve`` then stops with an error rather than serve without its code.
"""

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

CODE_SERVER_ENV = "TP_CODE_SERVER_SOCKET"
LOCATION = "tenant_pipelines"  # the name workspace.yaml gives our location
HEARTBEAT_TIMEOUT_S = 30
HEARTBEAT_INTERVAL_S = 5
STARTUP_TIMEOUT_S = 120  # a cold import on a loaded 2-core machine takes 5-20 s
STOP_TIMEOUT_S = 10

log = logging.getLogger("tenant_pipelines.code_server")


class CodeServer:
    """A supervised ``dagster api grpc`` for ``tenant_pipelines.definitions:defs``."""

    def __init__(self, instance_ref: str, cwd: Path, on_give_up: Callable[[], None]) -> None:
        # mkdtemp is 0700: no other local user can reach the socket (the server can run code).
        # A short /tmp path also stays under the 107-byte limit of a socket path.
        self.directory = Path(tempfile.mkdtemp(prefix="tenant-pipelines-"))
        self.socket = str(self.directory / "code.sock")
        self.workspace_file = self.directory / "workspace.yaml"
        self.failed = False
        self._cwd = cwd
        self._on_give_up = on_give_up
        self._stopping = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._supervisor: threading.Thread | None = None
        # The same arguments as Dagster's own managed code servers (GrpcServerProcess).
        self.args = [
            sys.executable,
            "-m",
            "dagster",
            "api",
            "grpc",
            "--socket",
            self.socket,
            "--heartbeat",
            "--heartbeat-timeout",
            str(HEARTBEAT_TIMEOUT_S),
            "--inject-env-vars-from-instance",
            "--instance-ref",
            instance_ref,
            "--location-name",
            LOCATION,
            "--module-name",
            "tenant_pipelines.definitions",
            "--attribute",
            "defs",
        ]
        workspace = {
            "load_from": [{"grpc_server": {"socket": self.socket, "location_name": LOCATION}}]
        }
        self.workspace_file.write_text(json.dumps(workspace))  # JSON is YAML

    @property
    def pid(self) -> int | None:
        """The server's pid, or None before ``start``."""
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        """Start the server, wait until it answers, then supervise it in a thread."""
        self._spawn()
        self._supervisor = threading.Thread(
            target=self._supervise, name="code-server-supervisor", daemon=True
        )
        self._supervisor.start()

    def _spawn(self) -> None:
        from dagster._grpc.client import DagsterGrpcClient
        from dagster._grpc.server import wait_for_grpc_server

        self._proc = subprocess.Popen(self.args, cwd=self._cwd, start_new_session=True)
        try:
            wait_for_grpc_server(
                self._proc, DagsterGrpcClient(socket=self.socket), self.args, STARTUP_TIMEOUT_S
            )
        except Exception:
            self._proc.kill()
            self._proc.wait()
            raise
        log.info("code server pid %s on %s", self._proc.pid, self.socket)

    def _supervise(self) -> None:
        from dagster._core.errors import DagsterUserCodeUnreachableError
        from dagster._grpc.client import DagsterGrpcClient

        client = DagsterGrpcClient(socket=self.socket)
        while True:
            assert self._proc is not None
            try:
                code = self._proc.wait(timeout=HEARTBEAT_INTERVAL_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(DagsterUserCodeUnreachableError):
                    client.heartbeat("ping")
                # /tmp cleaners (systemd-tmpfiles: 10 days) go by timestamps, which using a
                # socket does not change: without this a long-lived service loses its socket.
                for path in (self.directory, self.workspace_file, Path(self.socket)):
                    with contextlib.suppress(OSError):
                        os.utime(path)
                continue
            if self._stopping.is_set():
                return
            log.error("code server pid %s exited with code %s: restarting it", self._proc.pid, code)
            try:
                self._spawn()
            except Exception:
                log.exception("could not restart the code server: giving up")
                self.failed = True
                self._on_give_up()
                return

    def stop(self) -> None:
        """Shut the server down (gRPC shutdown, then SIGTERM, then SIGKILL); remove its folder."""
        self._stopping.set()
        self._end()
        if self._supervisor is not None:
            self._supervisor.join()
        self._end()  # a restart that raced with the stop
        shutil.rmtree(self.directory, ignore_errors=True)

    def _end(self) -> None:
        from dagster._core.errors import DagsterUserCodeUnreachableError
        from dagster._grpc.client import DagsterGrpcClient

        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(DagsterUserCodeUnreachableError):
            DagsterGrpcClient(socket=self.socket).shutdown_server()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
