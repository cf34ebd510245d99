"""The single Dagster ``Definitions`` of tenant-pipelines (workspace.yaml points here)."""

from dagster import Definitions, EnvVar

from .assets import Platform, provision_tenant
from .sensors import SENSORS

platform = Platform(
    data_dir=EnvVar("TP_DATA_DIR"),
    control_url=EnvVar("TP_CONTROL_URL"),
    migrations_dir=EnvVar("TP_MIGRATIONS_DIR"),
    tenant_pg_url=EnvVar("TP_TENANT_PG_URL"),
    tenant_pg_shared_db=EnvVar("TP_TENANT_PG_SHARED_DB"),
    tenant_pg_template=EnvVar("TP_TENANT_PG_TEMPLATE"),
    location_prefix=EnvVar("TP_LOCATION_PREFIX"),
    mssql_url=EnvVar("TP_MSSQL_URL"),
    redis_url=EnvVar("TP_REDIS_URL"),
    smtp_host=EnvVar("TP_SMTP_HOST"),
    smtp_port=EnvVar("TP_SMTP_PORT"),
    smtp_starttls=EnvVar("TP_SMTP_STARTTLS"),
    smtp_user=EnvVar("TP_SMTP_USER"),
    smtp_password=EnvVar("TP_SMTP_PASSWORD"),
    smtp_sender=EnvVar("TP_SMTP_SENDER"),
    public_url=EnvVar("TP_PUBLIC_URL"),
    lock_timeout_s=EnvVar("TP_LOCK_TIMEOUT_S"),
    reset_token_ttl_s=EnvVar("TP_RESET_TOKEN_TTL_S"),
)

defs = Definitions(
    jobs=[provision_tenant],
    sensors=SENSORS,
    resources={"platform": platform},
)
