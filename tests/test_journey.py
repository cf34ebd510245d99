"""The tenant admin's first login, end to end: a real ``tenantctl serve`` configured for a real
SMTP server (aiosmtpd with STARTTLS and AUTH, started here), the API, the emailed one-time
token, reset-password, login and ``me``; and no secret anywhere it should not be."""

import contextlib
import dataclasses
import re
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from conftest import Served, free_port, pg_database, provision, serve_env, uid, wait_for
from dagster import DagsterInstance

from tenant_pipelines import auth, delivery, identity, registry
from tenant_pipelines.providers import provider_for, tenant_engine
from tenant_pipelines.settings import Settings

SMTP_USER = "mailer"
SMTP_PASSWORD = "smtp-" + uuid.uuid4().hex  # must never show up in a log or a table
ADMIN_PASSWORD = "platform admin pass phrase"
TENANT_PASSWORD = "tenant admin pass phrase"
TOKEN_LINE = re.compile(r"^    ([A-Za-z0-9_-]{40,})\r?$", re.MULTILINE)


class Inbox:
    """An aiosmtpd handler keeping every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], Message]] = []
        self.logins: list[str] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content if isinstance(envelope.content, bytes) else b""
        self.messages.append((list(envelope.rcpt_tos), message_from_bytes(content)))
        return "250 OK"

    def to(self, address: str) -> list[Message]:
        return [m for rcpt, m in self.messages if address in rcpt]

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and data.login == SMTP_USER.encode()
            and data.password == SMTP_PASSWORD.encode()
        )
        if ok:
            self.logins.append(SMTP_USER)
        return AuthResult(success=ok)


@dataclasses.dataclass
class Mail:
    inbox: Inbox
    port: int


@pytest.fixture(scope="module")
def mail(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mail]:
    """SMTP on 127.0.0.1 requiring STARTTLS (self-signed certificate) and AUTH."""
    tls_dir = tmp_path_factory.mktemp("smtp_tls")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(tls_dir / "key.pem"),
            "-out",
            str(tls_dir / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_dir / "cert.pem", tls_dir / "key.pem")
    inbox = Inbox()
    port = free_port()
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=port,
        tls_context=context,
        require_starttls=True,
        authenticator=inbox.authenticate,
        auth_require_tls=True,
    )
    controller.start()
    try:
        yield Mail(inbox, port)
    finally:
        controller.stop()


def smtp_settings(mail: Mail) -> dict[str, str]:
    return {
        "smtp_host": "127.0.0.1",
        "smtp_port": str(mail.port),
        "smtp_starttls": "1",
        "smtp_user": SMTP_USER,
        "smtp_password": SMTP_PASSWORD,
        "smtp_sender": "provisioning@tenant-pipelines.example.com",
    }


@pytest.fixture(scope="module")
def mail_served(tmp_path_factory: pytest.TempPathFactory, mail: Mail) -> Iterator[Served]:
    """A second real service, configured to email reset tokens."""
    data_dir = tmp_path_factory.mktemp("mail_served")
    port = free_port()
    with pg_database(f"tp_ctl_{uuid.uuid4().hex[:10]}") as control_url:
        env = serve_env(
            data_dir,
            control_url=control_url,
            public_url=f"http://127.0.0.1:{port}",
            **smtp_settings(mail),
        )
        srv = Served(data_dir, env, port)
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()
            for tenant in registry.list_tenants(srv.settings, limit=10_000)[0]:
                with contextlib.suppress(Exception):
                    provider_for(srv.settings, tenant).drop()
            registry.engine(srv.settings).dispose()
            registry._engines.pop(control_url, None)


def rows_as_text(engine: sa.Engine) -> str:
    """Every row of every table of a database, as one string to search for secrets."""
    meta = sa.MetaData()
    with engine.connect() as conn:
        meta.reflect(bind=conn)
        return "\n".join(
            repr(row) for table in meta.sorted_tables for row in conn.execute(sa.select(table))
        )


def files_containing(folder: Path, secrets: dict[str, str]) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{name} in {path}" for name, s in secrets.items() if s.encode() in data]
    return found


def test_tenant_admin_journey_from_create_to_me_through_real_email(
    mail_served: Served, mail: Mail
) -> None:
    srv = mail_served
    email = f"{uid('boss')}@example.com"
    auth.create_admin(srv.settings, email, ADMIN_PASSWORD)
    api_token = auth.create_api_token(srv.settings, uid("ci"), "test")
    admin = {"Authorization": f"Bearer {api_token}"}
    tenant_id = uid("journey")
    owner = f"Owner@{tenant_id.replace('_', '-')}.example.com"
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        r = client.post(
            "/api/tenants",
            headers=admin,
            json={"id": tenant_id, "name": "Journey Inc", "admin_email": owner},
        )
        assert r.status_code == 202, r.text
        correlation = r.json()["correlation_id"]

        messages = wait_for(lambda: mail.inbox.to(owner.lower()), timeout=90, what="the email")
        assert len(messages) == 1
        message = messages[0]
        assert message["Subject"] == "Your administrator account for Journey Inc"
        assert message["From"] == "provisioning@tenant-pipelines.example.com"
        body = str(message.get_payload(decode=True), "utf-8")
        assert f"{srv.url}/api/t/{tenant_id}/auth/reset-password" in body
        reset_token = TOKEN_LINE.findall(body)[0]
        assert mail.inbox.logins, "the service logged in to SMTP after STARTTLS"

        def active() -> bool:
            got = client.get(f"/api/tenants/{tenant_id}", headers=admin).json()["tenant"]
            return bool(got["status"] == "active")

        wait_for(active, timeout=90, interval=0.25, what="active")
        tenant = client.get(f"/api/tenants/{tenant_id}", headers=admin).json()["tenant"]
        assert tenant["credentials_state"] == "delivered"
        # Delivered by email: there is nothing left to pick up out of band.
        assert (
            client.post(f"/api/tenants/{tenant_id}/credentials", headers=admin).status_code == 409
        )

        reset = {"token": reset_token, "new_password": TENANT_PASSWORD}
        r = client.post(f"/api/t/{tenant_id}/auth/reset-password", json=reset)
        assert r.status_code == 200, r.text
        assert r.json()["email"] == owner.lower()

        r = client.post(
            f"/api/t/{tenant_id}/auth/login", json={"email": owner, "password": TENANT_PASSWORD}
        )
        assert r.status_code == 200, r.text
        login = r.json()
        set_cookie = r.headers["set-cookie"].lower()
        assert f"path=/api/t/{tenant_id}/" in set_cookie and "httponly" in set_cookie
        session_token = login["token"]
        assert login["me"]["roles"] == ["admin"]

        r = client.get(
            f"/api/t/{tenant_id}/me", headers={"Authorization": f"Bearer {session_token}"}
        )
        assert r.status_code == 200, r.text
        me = r.json()
        assert me["user"]["email"] == owner.lower()
        assert me["tenant"] == {"id": tenant_id, "name": "Journey Inc"}
        assert me["roles"] == ["admin"]
        assert me["permissions"] == sorted(identity.PERMISSIONS)
        client.cookies.clear()

        # The token worked once; it now fails, also with another password.
        for password in (TENANT_PASSWORD, "yet another pass phrase"):
            r = client.post(
                f"/api/t/{tenant_id}/auth/reset-password",
                json={"token": reset_token, "new_password": password},
            )
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_token"
        # The tenant session is good for its own tenant only, and for nothing of the platform.
        tenant_bearer = {"Authorization": f"Bearer {session_token}"}
        assert client.get("/api/tenants", headers=tenant_bearer).status_code == 403
        assert client.get("/api/t/root/me", headers=tenant_bearer).status_code == 403
        history = client.get(f"/api/tenants/{tenant_id}/provisioning", headers=admin).json()
        assert history["runs"][-1]["correlation_id"] == correlation
        trail = client.get(f"/api/tenants/{tenant_id}/audit", headers=admin).json()["events"]
        events = [e["event"] for e in trail]
        assert "credentials_delivered" in events and "admin_password_set" in events
        assert len(mail.inbox.to(owner.lower())) == 1, "one email for one token"

    secrets = {
        "reset token": reset_token,
        "smtp password": SMTP_PASSWORD,
        "api token": api_token,
        "tenant session": session_token,
        "tenant password": TENANT_PASSWORD,
        "admin password": ADMIN_PASSWORD,
    }
    # Logs, Dagster's event log and compute logs (SQLite and files under the data folder).
    assert files_containing(srv.data_dir, secrets) == []
    with DagsterInstance.from_config(str(srv.data_dir / "dagster")) as instance:
        records = instance.get_run_records()
        assert records, "the runs of this service are in this instance"
        for record in records:
            logs = repr(instance.all_logs(record.dagster_run.run_id))
            assert not [n for n, s in secrets.items() if s in logs]
    # The control plane (audit rows, sessions, tokens) and the tenant's own database.
    control = rows_as_text(registry.engine(srv.settings))
    tenant_db = rows_as_text(
        tenant_engine(srv.settings, registry.get_tenant(srv.settings, tenant_id))
    )
    for text in (control, tenant_db):
        assert not [n for n, s in secrets.items() if s in text]
    assert identity.token_hash(reset_token) in tenant_db, "the token is stored as its hash"


def test_a_retried_delivery_never_leaves_two_valid_tokens_or_sends_two_emails(
    settings: Settings, instance: DagsterInstance, tenants: Any, mail: Mail
) -> None:
    tenant = tenants.create()
    assert provision(settings, instance, tenant.id).success
    tenant = registry.get_tenant(settings, tenant.id)
    engine = tenant_engine(settings, tenant)
    assert tenant.credentials_state == "awaiting_pickup"
    # Replay the credentials step as if SMTP had been configured from the start.
    registry.set_fields(settings, tenant.id, credentials_state="pending")
    smtp = {k: v for k, v in smtp_settings(mail).items()}
    working = dataclasses.replace(
        settings,
        smtp_host=smtp["smtp_host"],
        smtp_port=mail.port,
        smtp_starttls=True,
        smtp_user=SMTP_USER,
        smtp_password=SMTP_PASSWORD,
    )
    down = dataclasses.replace(working, smtp_port=free_port())
    with pytest.raises(OSError):
        delivery.deliver(down, registry.get_tenant(settings, tenant.id))
    assert identity.valid_reset_tokens(engine, tenant) == 1
    assert registry.get_tenant(settings, tenant.id).credentials_state == "pending"
    assert mail.inbox.to(tenant.admin_email) == []

    assert delivery.deliver(working, registry.get_tenant(settings, tenant.id)) == {
        "channel": "email"
    }
    assert delivery.deliver(working, registry.get_tenant(settings, tenant.id))["channel"] == "none"
    messages = mail.inbox.to(tenant.admin_email)
    assert len(messages) == 1
    assert identity.valid_reset_tokens(engine, tenant) == 1
    token = TOKEN_LINE.findall(str(messages[0].get_payload(decode=True), "utf-8"))[0]
    assert identity.reset_password(engine, token, TENANT_PASSWORD) == tenant.admin_email
    assert identity.valid_reset_tokens(engine, tenant) == 0
    with pytest.raises(registry.ConflictError):
        delivery.pickup(settings, tenant.id, "test")
