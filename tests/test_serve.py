"""``tenantctl serve`` as a process tree: one shared code server, supervised, and nothing
left behind on SIGTERM or SIGINT. Real processes, inspected through /proc."""

import contextlib
import os
import shutil
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Served, free_port, serve_env, uid, wait_for

from tenant_pipelines import auth, providers, registry
from tenant_pipelines.providers import provider_for

pytestmark = pytest.mark.slow


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process, or None once it is gone (or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else (int(fields[1]), fields[19])


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


def tree(root: int) -> dict[int, tuple[str, str]]:
    """Every live descendant of ``root``: pid -> (start time, command line)."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))):
            parents.setdefault(st[0], []).append(int(entry))
            starts[int(entry)] = st[1]
    out, todo = {}, list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        out[pid] = (starts[pid], _cmdline(pid))
        todo.extend(parents.get(pid, []))
    return out


def code_servers(root: int) -> dict[int, str]:
    return {pid: cmd for pid, (_, cmd) in tree(root).items() if " api grpc " in cmd}


def daemon_pid(root: int) -> int:
    (pid,) = [p for p, (_, cmd) in tree(root).items() if "tenant_pipelines.launcher run" in cmd]
    return pid


def run_workers(root: int) -> list[int]:
    """Forks of the forkserver (the forkserver itself is the daemon's child)."""
    forkservers = {p for p, (_, cmd) in tree(root).items() if "forkserver import main" in cmd}
    return [p for p in forkservers if (st := _stat(p)) and st[0] in forkservers]


def survivors(before: dict[int, tuple[str, str]]) -> list[str]:
    """The command lines of the processes of ``before`` still alive (same pid, same start)."""
    return [cmd for pid, (start, cmd) in before.items() if (_stat(pid) or (0, ""))[1] == start]


def root_active(srv: Served) -> Callable[[], bool]:
    return lambda: registry.get_tenant(srv.settings, registry.ROOT_TENANT).status == "active"


@contextlib.contextmanager
def serve(tmp_path: Path) -> Iterator[Served]:
    """A ``tenantctl serve`` on the embedded default (SQLite control plane and Dagster storage)."""
    env = serve_env(tmp_path / "data")
    srv = Served(tmp_path / "data", env, free_port()).start()
    try:
        yield srv
    finally:
        srv.stop()
        for tenant in registry.list_tenants(srv.settings, limit=100)[0]:
            with contextlib.suppress(Exception):
                provider_for(srv.settings, tenant).drop()
        providers.drop_templates(srv.settings)
        registry.engine(srv.settings).dispose()
        shutil.rmtree(tmp_path, ignore_errors=True)


def create_and_wait_active(srv: Served, token: str) -> None:
    tenant_id = uid()
    body = {"id": tenant_id, "name": "Serve", "admin_email": "admin@serve.example.com"}
    headers = {"Authorization": f"Bearer {token}"}
    r = httpx.post(srv.url + "/api/tenants", json=body, headers=headers, timeout=60)
    assert r.status_code == 202, r.text

    def active() -> bool:
        return registry.get_tenant(srv.settings, tenant_id).status == "active"

    wait_for(active, timeout=180, what=f"{tenant_id} active")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_serve_alone_stops_every_child(tmp_path: Path, sig: signal.Signals) -> None:
    with serve(tmp_path) as srv:
        assert srv.proc is not None
        root = srv.proc.pid
        wait_for(root_active(srv), timeout=180, what="the root tenant")
        wait_for(lambda: not run_workers(root), timeout=60, what="the bootstrap run's worker")
        before = tree(root)
        commands = " | ".join(cmd for _, cmd in before.values())
        # What must go away: the code server, the daemon, its forkserver and resource tracker.
        for part in (
            " api grpc ",
            "tenant_pipelines.launcher run",
            "forkserver",
            "resource_tracker",
        ):
            assert part in commands
        # Only the main process, not its group: the children must be stopped by serve itself.
        os.kill(root, sig)
        srv.proc.wait(timeout=120)

        wait_for(lambda: not survivors(before), timeout=60, what="every child of serve to exit")
        # SIGTERM is a requested stop: 0. SIGINT: 130, or 0 when the parent left SIGINT ignored
        # (uvicorn re-raises it after its shutdown, to the disposition it found).
        assert srv.proc.returncode in ((0,) if sig == signal.SIGTERM else (0, 130))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, str]]:
    with serve(tmp_path_factory.mktemp("serve")) as srv:
        token = auth.create_api_token(srv.settings, uid("ci"), "test")
        yield srv, token


def test_the_daemon_loads_the_shared_code_server(shared: tuple[Served, str]) -> None:
    srv, _ = shared
    assert srv.proc is not None
    servers = code_servers(srv.proc.pid)
    shared_socket = [p for p, cmd in servers.items() if "tenant-pipelines-" in cmd]
    assert len(shared_socket) == 1, servers
    daemon = daemon_pid(srv.proc.pid)
    assert "tenant-pipelines-" in _cmdline(daemon)  # -w <the generated workspace file>
    assert not code_servers(daemon), "the daemon started a code server of its own"


def test_one_code_server_for_the_whole_service(shared: tuple[Served, str]) -> None:
    srv, _ = shared
    assert srv.proc is not None
    # The bootstrap's short-lived workspace (if any) has shut its server down by now.
    wait_for(root_active(srv), timeout=180, what="the root tenant")
    assert len(code_servers(srv.proc.pid)) == 1, code_servers(srv.proc.pid)


def test_a_killed_code_server_is_restarted_and_runs_still_launch(
    shared: tuple[Served, str],
) -> None:
    srv, token = shared
    assert srv.proc is not None
    root = srv.proc.pid
    (old,) = [p for p, cmd in code_servers(root).items() if "tenant-pipelines-" in cmd]
    os.kill(old, signal.SIGKILL)

    def restarted() -> list[int]:
        return [
            p for p, cmd in code_servers(root).items() if "tenant-pipelines-" in cmd and p != old
        ]

    wait_for(restarted, timeout=120, what="a new code server")
    # Launched through the service's GraphQL, dequeued and launched by the daemon.
    create_and_wait_active(srv, token)
    assert srv.proc.poll() is None
    assert "exited with code -9: restarting it" in srv.log.read_text()


def test_serve_stops_with_an_error_when_the_code_server_cannot_restart(tmp_path: Path) -> None:
    with serve(tmp_path) as srv:
        assert srv.proc is not None
        root = srv.proc.pid
        (pid,) = [p for p, cmd in code_servers(root).items() if "tenant-pipelines-" in cmd]
        before = tree(root)
        socket = _cmdline(pid).split("--socket ", 1)[1].split()[0]
        # The restart cannot bind its socket: the folder is replaced by a file.
        folder = Path(socket).parent
        shutil.rmtree(folder)
        folder.write_text(uuid.uuid4().hex)
        try:
            os.kill(pid, signal.SIGKILL)
            srv.proc.wait(timeout=240)
        finally:
            folder.unlink()
        assert srv.proc.returncode == 1
        log = srv.log.read_text()
        assert "could not restart the code server: giving up" in log
        assert "error: the code server died and could not be restarted" in log
        wait_for(lambda: not survivors(before), timeout=60, what="every child of serve to exit")
