"""``tenantctl``: create, watch, retry and serve tenants from a terminal.

The CLI is an operator's tool with direct access to the control plane and the Dagster
instance (the same settings as the service), like ``manage.py``; automation uses the API.
Errors are one line on stderr and a non-zero exit, never a traceback.
"""

import argparse
import contextlib
import datetime as dt
import gc
import getpass
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from .settings import MODULES, PACKAGE_DIR, PROVIDERS, STRATEGIES, Settings, SettingsError

REPO_DIR = PACKAGE_DIR.parent
EXIT_FAILED = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A one-line message for the operator."""


def prepare(settings: Settings) -> Settings:
    """Everything a command needs before it touches anything: secret key, control-plane
    schema at head, ``DAGSTER_HOME`` and the ``TP_*`` variables child processes inherit."""
    from . import registry

    settings = settings.ensure_secret_key()
    if "DAGSTER_HOME" not in os.environ:
        home = settings.data_dir / "dagster"
        home.mkdir(parents=True, exist_ok=True)
        if not (home / "dagster.yaml").exists():
            shutil.copy(REPO_DIR / "dagster.yaml", home / "dagster.yaml")
        os.environ["DAGSTER_HOME"] = str(home)
    os.environ.update(settings.env())
    from .telemetry import register_settings_secrets

    register_settings_secrets(settings)
    with registry.tenant_lock(settings, "__control_upgrade", 120):
        registry.upgrade(settings)
    return settings


@contextlib.contextmanager
def dagster() -> Iterator[Any]:
    """The Dagster instance and a workspace context for launching runs."""
    from dagster import DagsterInstance

    from . import runs

    with DagsterInstance.get() as instance, runs.workspace(instance) as ctx:
        yield ctx


def _print(args: argparse.Namespace, data: Any, human: str) -> None:
    print(json.dumps(data, indent=2, default=str) if getattr(args, "json", False) else human)


def _tenant_line(t: dict[str, Any]) -> str:
    reason = f"  ({t['status_reason']})" if t.get("status_reason") else ""
    return (
        f"{t['id']:<24} {t['status']:<13} {t['provider']:<10} {t['strategy']:<8} "
        f"{t['location']}{reason}"
    )


def cmd_create(args: argparse.Namespace, settings: Settings) -> int:
    from . import registry, runs

    valid_until = None
    if args.valid_until:
        try:
            valid_until = dt.datetime.fromisoformat(args.valid_until)
        except ValueError:
            raise CliError("--valid-until must be an ISO 8601 timestamp") from None
    req = registry.TenantRequest(
        id=args.id,
        name=args.name,
        admin_email=args.admin_email,
        provider=args.provider,
        strategy=args.strategy,
        location=args.location,
        modules=tuple(args.modules.split(",")) if args.modules else MODULES,
        demo_data=args.demo_data,
        valid_until=valid_until,
    )
    with dagster() as ctx:
        tenant = runs.create_tenant(ctx, settings, req, actor=f"cli:{getpass.getuser()}")
        _print(args, tenant.to_json(), f"created {tenant.id} (correlation {tenant.correlation_id})")
        return _wait(args, settings, ctx, tenant.id) if args.wait else 0


def _wait(
    args: argparse.Namespace, settings: Settings, ctx: Any, tenant_id: str, timeout: float = 600
) -> int:
    """Follow a provisioning step by step until the tenant is in a final state."""
    from . import registry, runs

    seen: dict[tuple[str, str], str] = {}
    deadline = time.monotonic() + timeout
    quiet = getattr(args, "json", False)
    while time.monotonic() < deadline:
        tenant = registry.get_tenant(settings, tenant_id)
        history = runs.history(ctx.instance, tenant_id, limit=1)
        for run in history[:1]:
            for step in run["steps"]:
                key = (run["run_id"], step["step"])
                if seen.get(key) != step["status"] and not quiet:
                    took = f" {step['duration_s']:.2f}s" if step["duration_s"] is not None else ""
                    err = f"  {step['error']}" if step.get("error") else ""
                    print(f"  {step['step']:<20} {step['status'].lower()}{took}{err}", flush=True)
                seen[key] = step["status"]
        if tenant.status in registry.FINAL_STATUSES and not runs.unfinished_run(
            ctx.instance, tenant_id
        ):
            if not quiet:
                reason = f": {tenant.status_reason}" if tenant.status_reason else ""
                print(f"{tenant_id} is {tenant.status}{reason}")
            return 0 if tenant.status == "active" else EXIT_FAILED
        time.sleep(0.25)
    raise CliError(f"gave up waiting after {timeout:.0f}s; tenantctl status {tenant_id} shows more")


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    from . import registry

    items, total = registry.list_tenants(settings, args.status, args.limit, args.offset)
    data = {"items": [t.to_json() for t in items], "total": total}
    lines = [_tenant_line(t.to_json()) for t in items] or ["no tenants"]
    _print(args, data, "\n".join(lines))
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from dagster import DagsterInstance

    from . import registry, runs

    tenant = registry.get_tenant(settings, args.id)
    with DagsterInstance.get() as instance:
        history = runs.history(instance, args.id, limit=args.runs)
    data = {"tenant": tenant.to_json(), "runs": history}
    lines = [_tenant_line(tenant.to_json())]
    for run in history:
        lines.append(f"run {run['run_id']}  {run['status']}  correlation {run['correlation_id']}")
        for s in run["steps"]:
            took = f"{s['duration_s']:.3f}s" if s["duration_s"] is not None else "-"
            err = f"  {s['error']}" if s.get("error") else ""
            lines.append(
                f"  {s['step']:<20} {s['status']:<12} {s['start'] or '-':<33} {took:>9}"
                f"  x{s['attempts']}{err}"
            )
    _print(args, data, "\n".join(lines))
    return 0


def _action(name: str) -> Any:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        from . import runs

        actor = f"cli:{getpass.getuser()}"
        if name == "deactivate":
            tenant = runs.deactivate(settings, args.id, actor)
            _print(args, tenant.to_json(), f"{tenant.id} is {tenant.status}")
            return 0
        with dagster() as ctx:
            tenant = getattr(runs, name)(ctx, settings, args.id, actor)
            _print(args, tenant.to_json(), f"{name}: {tenant.id} is {tenant.status}")
            if getattr(args, "wait", False):
                return _wait(args, settings, ctx, tenant.id)
        return 0

    return run


def cmd_credentials(args: argparse.Namespace, settings: Settings) -> int:
    from . import delivery

    token = delivery.pickup(settings, args.id, actor=f"cli:{getpass.getuser()}")
    _print(
        args,
        {"tenant_id": args.id, "reset_token": token},
        f"one-time reset token for {args.id} (shown once):\n{token}",
    )
    return 0


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    from . import registry

    registry.get_tenant(settings, args.id)
    events = registry.audit_trail(settings, args.id)
    lines = [
        f"{e['at']}  {e['event']:<22} {e['actor']:<20} {e['correlation_id'] or '-'}  "
        f"{json.dumps(e['details'], sort_keys=True)}"
        for e in events
    ]
    _print(args, {"events": events}, "\n".join(lines) or "no events")
    return 0


class _Terminated(Exception):
    """SIGTERM: stop the way Ctrl-C does, through the ``finally`` that stops the children."""


def _terminated(_signum: int, _frame: object) -> None:
    # Python's default SIGTERM ends the process on the spot, so the daemon and the code server
    # would outlive it. uvicorn re-raises the signal after its graceful shutdown: it lands here.
    raise _Terminated


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run the daemon and the HTTP service (API + Dagster UI) until interrupted.

    One code server serves both (tenant_pipelines/code_server.py); SIGTERM and SIGINT stop the
    service, then the daemon (with its forkserver), then the code server.
    """
    import uvicorn
    from dagster import DagsterInstance
    from dagster._serdes import serialize_value

    from . import api, registry, runs
    from .code_server import CODE_SERVER_ENV, CodeServer
    from .telemetry import configure_logging, get_logger

    configure_logging()
    log = get_logger()
    # Create the instance's storage before the daemon starts: two processes initialising a
    # fresh SQLite DAGSTER_HOME at once can corrupt its schema.
    instance = DagsterInstance.get()
    signal.signal(signal.SIGTERM, _terminated)
    code_server = CodeServer(
        serialize_value(instance.get_ref()),
        cwd=REPO_DIR,
        # uvicorn turns the signal into a graceful shutdown; the CliError below says why.
        on_give_up=lambda: os.kill(os.getpid(), signal.SIGTERM),
    )
    daemon: subprocess.Popen[bytes] | None = None
    try:
        code_server.start()
        # The service's workspace (runs.workspace_target) and every child load this server.
        os.environ[CODE_SERVER_ENV] = code_server.socket
        # dagster-daemon, with the run launcher's forkserver started first (launcher.py).
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tenant_pipelines.launcher",
                "run",
                "-w",
                str(code_server.workspace_file),
            ],
            cwd=REPO_DIR,
        )
        app = api.create_app(settings, instance)
        if not _root_exists(settings):
            with runs.workspace(instance) as ctx:
                runs.create_tenant(
                    ctx,
                    settings,
                    registry.TenantRequest(
                        id=registry.ROOT_TENANT,
                        name="Platform",
                        admin_email=settings.root_admin_email,
                    ),
                    actor="system",
                    allow_reserved=True,
                )
            log.info("root tenant bootstrap submitted")
        host, port = args.host or settings.host, args.port or settings.port
        print(
            f"tenant-pipelines on http://{host}:{port}  (Dagster UI: /dagster, API: /api)",
            flush=True,
        )
        # Everything loaded so far (Dagster, the UI's schema, our code) lives as long as the
        # process: out of the collector's sight, full collections stop pausing the API for
        # tens of milliseconds (p99 of the status reads, docs/performance.md).
        gc.collect()
        gc.freeze()
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    except _Terminated:
        pass
    finally:
        # A second SIGTERM must not cut the shutdown short (a supervisor SIGKILLs if it hangs).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        code_server.stop()
    if code_server.failed:
        raise CliError("the code server died and could not be restarted: see the log above")
    return 0


def _root_exists(settings: Settings) -> bool:
    from . import registry

    try:
        registry.get_tenant(settings, registry.ROOT_TENANT)
    except registry.NotFoundError:
        return False
    return True


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tenantctl", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("create", help="create a tenant and provision it")
    c.add_argument("id")
    c.add_argument("--name", required=True)
    c.add_argument("--admin-email", required=True)
    c.add_argument("--provider", choices=PROVIDERS)
    c.add_argument("--strategy", choices=STRATEGIES, default="database")
    c.add_argument("--location", help="database or schema name (default tenant_<id>)")
    c.add_argument("--modules", help=f"comma-separated, default {','.join(MODULES)}")
    c.add_argument("--demo-data", action="store_true")
    c.add_argument("--valid-until", help="ISO 8601 timestamp with time zone")
    c.add_argument("--wait", action="store_true", help="follow the steps until it ends")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_create)

    ls = sub.add_parser("list", help="list tenants")
    ls.add_argument("--status")
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--offset", type=int, default=0)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_list)

    st = sub.add_parser("status", help="a tenant and its provisioning runs, step by step")
    st.add_argument("id")
    st.add_argument("--runs", type=int, default=3, help="how many runs to show")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_status)

    for name, text in (
        ("retry", "resume a failed or cancelled tenant from its failed step"),
        ("activate", "(re-)activate a tenant: runs the pipeline again"),
        ("deactivate", "keep a tenant but stop serving it"),
        ("cancel", "terminate the tenant's provisioning run"),
    ):
        a = sub.add_parser(name, help=text)
        a.add_argument("id")
        a.add_argument("--json", action="store_true")
        if name in ("retry", "activate"):
            a.add_argument("--wait", action="store_true")
        a.set_defaults(fn=_action(name))

    cr = sub.add_parser("credentials", help="pick up the admin's one-time reset token (once)")
    cr.add_argument("id")
    cr.add_argument("--json", action="store_true")
    cr.set_defaults(fn=cmd_credentials)

    au = sub.add_parser("audit", help="a tenant's audit trail")
    au.add_argument("id")
    au.add_argument("--json", action="store_true")
    au.set_defaults(fn=cmd_audit)

    sv = sub.add_parser("serve", help="run the daemon, the API and the Dagster UI")
    sv.add_argument("--host")
    sv.add_argument("--port", type=int)
    sv.set_defaults(fn=cmd_serve)

    from . import auth

    auth.add_cli_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tenantctl`` console script."""
    from .registry import RegistryError

    args = parser().parse_args(argv)
    try:
        settings = prepare(Settings.from_env())
        return int(args.fn(args, settings))
    except (CliError, SettingsError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from .telemetry import scrub

        print(f"error: {scrub(type(exc).__name__ + ': ' + str(exc))}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
