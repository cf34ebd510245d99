"""Getting the tenant admin's one-time reset token to them, through exactly one channel.

With SMTP configured the token goes out by email; otherwise a platform admin picks it up once
(:func:`pickup`), which issues a fresh token and returns it a single time. Either way only the
token's hash is stored, and issuing a token revokes every earlier unused one, so a retried
delivery never leaves two valid tokens.
"""

import smtplib
from email.message import EmailMessage
from typing import Any

from . import identity, registry
from .providers import tenant_engine
from .registry import ConflictError, Tenant
from .settings import Settings
from .telemetry import register_secret


def reset_link(settings: Settings, tenant: Tenant) -> str:
    return f"{settings.public_url.rstrip('/')}/api/t/{tenant.id}/auth/reset-password"


def send_reset_email(settings: Settings, tenant: Tenant, token: str) -> None:
    """Send the reset token to the tenant admin over SMTP (STARTTLS and login if set)."""
    msg = EmailMessage()
    msg["Subject"] = f"Your administrator account for {tenant.name}"
    msg["From"] = settings.smtp_sender
    msg["To"] = tenant.admin_email
    msg.set_content(
        f"An administrator account was created for you on tenant '{tenant.id}'.\n\n"
        f"Set your password with this one-time token "
        f"(valid {settings.reset_token_ttl_s // 3600} h):\n\n"
        f"    {token}\n\n"
        f"POST it with your new password to {reset_link(settings, tenant)}\n"
    )
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=10) as smtp:
        if settings.smtp_starttls:
            smtp.starttls()
        if settings.smtp_user:
            smtp.login(settings.smtp_user, settings.smtp_password)
        smtp.send_message(msg)


def deliver(settings: Settings, tenant: Tenant) -> dict[str, Any]:
    """The credentials step: idempotent, so a retry after success sends nothing."""
    if tenant.credentials_state == "delivered":
        return {"channel": "none", "skipped": "already delivered"}
    if tenant.credentials_state == "awaiting_pickup" and not settings.smtp_host:
        return {"channel": "out_of_band", "skipped": "awaiting pickup"}
    token = identity.issue_reset_token(
        tenant_engine(settings, tenant), tenant, settings.reset_token_ttl_s
    )
    register_secret(token)
    if settings.smtp_host:
        send_reset_email(settings, tenant, token)
        state, channel = "delivered", "email"
    else:
        state, channel = "awaiting_pickup", "out_of_band"
    registry.set_fields(settings, tenant.id, credentials_state=state)
    if state == "delivered":
        registry.audit(
            settings,
            tenant.id,
            "credentials_delivered",
            "system",
            tenant.correlation_id,
            {"channel": channel},
        )
    return {"channel": channel}


def pickup(settings: Settings, tenant_id: str, actor: str) -> str:
    """Issue and return the admin's reset token, once; later calls raise ConflictError."""
    with registry.tenant_lock(settings, tenant_id, settings.lock_timeout_s):
        tenant = registry.get_tenant(settings, tenant_id)
        if tenant.credentials_state != "awaiting_pickup":
            raise ConflictError(
                f"credentials of '{tenant_id}' are not awaiting pickup ({tenant.credentials_state})"
            )
        token = identity.issue_reset_token(
            tenant_engine(settings, tenant), tenant, settings.reset_token_ttl_s
        )
        registry.set_fields(settings, tenant_id, credentials_state="delivered")
        registry.audit(
            settings,
            tenant_id,
            "credentials_delivered",
            actor,
            tenant.correlation_id,
            {"channel": "out_of_band"},
        )
        return token
