"""Every setting of the worker, in one object, read from the environment at the entry point only.

Environment variables are ``AB_WORKER_<FIELD>`` (case-insensitive); command-line flags override
them. Secrets are ``SecretStr`` so they never print in reprs, logs or errors.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.service.handling import DEFAULT_MAX_BODY_BYTES


class WorkerSettings(BaseSettings):
    """Configuration of ``ab-worker run`` (see the README's configuration table)."""

    # An empty variable (`AB_WORKER_X=` in a compose file or a shell) means "not set", not "set to nothing".
    model_config = SettingsConfigDict(
        env_prefix="AB_WORKER_", extra="ignore", case_sensitive=False, env_ignore_empty=True
    )

    experiments_file: str | None = Field(default=None, description="Registry file (YAML or JSON).")
    reload_interval: float = Field(default=2.0, gt=0, description="Seconds between checks of the registry file.")
    queue_name: str = Field(default="assignment-requests", description="Queue the requests arrive on.")
    topic_name: str = Field(default="assignment-events", description="Topic the events are published to.")
    servicebus_connection_string: SecretStr | None = Field(
        default=None, description="Service Bus connection string (secret)."
    )
    servicebus_namespace: str | None = Field(
        default=None,
        description="Fully qualified namespace, used with DefaultAzureCredential when no connection string.",
    )
    servicebus_try_timeout: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="Seconds one Service Bus attempt (send, link open, management call) may take (SDK try_timeout).",
    )
    servicebus_probe_after: float = Field(
        default=15.0,
        gt=0,
        le=3600,
        description="Seconds a quiet receiver connection goes unchecked before a liveness round trip.",
    )
    max_batch: int = Field(default=100, ge=1, le=5000, description="Messages per receive.")
    max_wait: float = Field(default=1.0, gt=0, le=60, description="Seconds to wait for a batch to fill.")
    receive_linger: float = Field(
        default=0.002,
        ge=0.001,
        le=1,
        description=(
            "Seconds a receive waits for the next message before returning what it has: a trickle is "
            "answered at once instead of after the SDK's 0.2 s wait for a batch to fill."
        ),
    )
    receive_window: float = Field(
        default=0.02,
        ge=0,
        # Well under the shortest lock Service Bus allows (5 s): gathered messages are not yet renewed.
        le=1,
        description=(
            "Seconds a batch keeps gathering after its first message while messages keep coming (each "
            "within the linger): a backlog still comes in full batches; bounds the latency gathering adds."
        ),
    )
    prefetch: int = Field(
        default=0,
        ge=0,
        description=(
            "Messages the receiver prefetches. 0 (default) locks only what each receive asks for; more is ~7% "
            "faster, but prefetched messages are not lock-renewed while a downstream outage pauses the worker."
        ),
    )
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=256, le=1024 * 1024)
    context_allow_list: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Context keys that may leave the worker (events, spans, Kusto). Empty by default.",
    )
    drain_deadline: float = Field(
        default=25.0,
        gt=0,
        description=(
            "Seconds from SIGTERM to exit. Enforced: what an outage holds is abandoned (released for another "
            "replica); a dependency call that has not returned by then is cut short by exiting."
        ),
    )
    liveness_timeout: float = Field(
        default=120.0,
        gt=0,
        description=(
            "/healthz fails when the pump loop has not turned for this long (wedged). Backing off during an "
            "outage counts as turning; keep it above max_wait, a link open (~10 s) and one dependency call "
            "(kusto_flush_attempts x kusto_attempt_timeout)."
        ),
    )
    telemetry: Literal["appinsights", "console", "none"] = Field(default="none")
    applicationinsights_connection_string: SecretStr | None = Field(
        default=None,
        validation_alias="APPLICATIONINSIGHTS_CONNECTION_STRING",
        description="Turns Azure Monitor on (the distro's standard variable).",
    )
    kusto_ingest_uri: str | None = Field(
        default=None, description="Kusto ingestion endpoint (https://ingest-<cluster>...); rows go there when set."
    )
    kusto_database: str = Field(default="assignments", description="Kusto database.")
    kusto_table: str = Field(default="AssignmentEvents", description="Kusto table.")
    kusto_mode: Literal["queued", "streaming"] = Field(default="queued", description="Ingestion mode.")
    kusto_max_rows: int = Field(default=500, ge=1, le=100_000, description="Flush when this many rows are buffered.")
    flush_max_age: float = Field(
        default=2.0,
        gt=0,
        le=300,
        validation_alias=AliasChoices("AB_WORKER_FLUSH_MAX_AGE", "AB_WORKER_KUSTO_MAX_AGE"),
        description="Every record sink (Kusto, --rows, count only) flushes when its oldest row is this old (s).",
    )
    kusto_flush_attempts: int = Field(default=3, ge=1, le=20, description="Tries per flush before the pump holds.")
    kusto_attempt_timeout: float = Field(default=5.0, gt=0, le=600, description="Deadline of each flush try (s).")
    telemetry_sampling_ratio: float | None = Field(
        default=None, ge=0, le=1, description="Fraction of traces kept (default: the distro's rate limit)."
    )
    health_port: int = Field(default=8080, ge=0, le=65535, description="Port of /healthz and /readyz (0: off).")
    health_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="Address /healthz and /readyz listen on; 0.0.0.0 in a pod, where the kubelet probes from outside.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("context_allow_list", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
