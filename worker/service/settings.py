"""Every setting of the worker, in one object, read from the environment at the entry point only.

Environment variables are ``AB_WORKER_<FIELD>`` (case-insensitive); command-line flags override
them. Secrets are ``SecretStr`` so they never print in reprs, logs or errors.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.service.handling import DEFAULT_MAX_BODY_BYTES


class WorkerSettings(BaseSettings):
    """Configuration of ``ab-worker run``; ``docs/configuration.md`` is generated from these fields."""

    # An empty variable (`AB_WORKER_X=` in a compose file or a shell) means "not set", not "set to nothing".
    # Frozen: a command's flags make a new object (with_overrides), so no code sees settings change under it.
    model_config = SettingsConfigDict(
        env_prefix="AB_WORKER_", extra="ignore", case_sensitive=False, env_ignore_empty=True, frozen=True
    )

    experiments_file: str | None = Field(default=None, description="Experiments file, YAML or JSON (or `--config`).")
    reload_interval: float = Field(
        default=2.0, gt=0, description="Seconds between checks of the experiments file for changes."
    )
    queue_name: str = Field(default="assignment-requests", description="Queue the requests arrive on.")
    topic_name: str = Field(default="assignment-events", description="Topic the events are published to.")
    servicebus_connection_string: SecretStr | None = Field(
        default=None, description="Service Bus connection string (secret; never logged)."
    )
    servicebus_namespace: str | None = Field(
        default=None,
        description="Fully qualified namespace, for `DefaultAzureCredential` when no connection string is set.",
    )
    servicebus_try_timeout: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description=(
            "Seconds one Service Bus attempt (send, link open, management call) may take: the SDK's "
            "`try_timeout`, also the unit of the watchdog that cuts a call on a silent connection."
        ),
    )
    servicebus_probe_after: float = Field(
        default=15.0,
        gt=0,
        le=3600,
        description="Seconds a quiet receiver connection goes unchecked before a round trip (a peek) proves it alive.",
    )
    max_batch: int = Field(default=100, ge=1, le=5000, description="Messages per receive (or `--max-batch`).")
    max_wait: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description=(
            "Seconds a receive waits for the first message (cut short when rows held for settlement fall "
            "due by `AB_WORKER_FLUSH_MAX_AGE`)."
        ),
    )
    receive_linger: float = Field(
        default=0.002,
        ge=0.001,
        le=1,
        description=(
            "Seconds a receive waits for the next message before returning what it has: a lone request is "
            "answered in milliseconds instead of after the SDK's 0.2 s wait for a batch to fill. The receiver "
            "reads its socket in slices this short, so an idle worker wakes every slice (about 5% of a core "
            "at 0.002 s; 0.01 halves that)."
        ),
    )
    receive_window: float = Field(
        default=0.02,
        ge=0,
        # Well under the shortest lock Service Bus allows (5 s): gathered messages are not yet renewed.
        le=1,
        description=(
            "Seconds a batch keeps gathering after its first message while messages keep coming, each "
            "within the linger: a backlog still comes in full batches of `AB_WORKER_MAX_BATCH`, and this "
            "bounds what gathering adds to a request's latency. The messages gathered are renewed only once "
            "the receive returns, and the shortest lock Service Bus allows is 5 s."
        ),
    )
    prefetch: int = Field(
        default=0,
        ge=0,
        description=(
            "Messages the receiver prefetches; 0 locks only what each receive asks for. More is about 7% "
            "faster (2,958 vs 2,750 msg/s measured), but prefetched messages are not lock-renewed while a "
            "downstream outage pauses the worker, so their delivery counts grow."
        ),
    )
    max_body_bytes: int = Field(
        default=DEFAULT_MAX_BODY_BYTES,
        ge=256,
        le=1024 * 1024,
        description="Larger request bodies are dead-lettered as `MessageTooLarge`, before anything else is checked.",
    )
    context_allow_list: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated context keys allowed to leave the worker (events, spans, Kusto); none by default.",
    )
    drain_deadline: float = Field(
        default=25.0,
        gt=0,
        description=(
            "Seconds from SIGTERM to exit. Enforced: what an outage holds is abandoned (released for another "
            "replica); a dependency call that has not returned by then is cut short by exiting (status 1)."
        ),
    )
    liveness_timeout: float = Field(
        default=120.0,
        gt=0,
        description=(
            "`/healthz` fails when the pump loop has not turned for this long (wedged); backing off during an "
            "outage counts as turning. Refused at start-up below its floor: `AB_WORKER_MAX_WAIT` + a link open "
            "(`AB_WORKER_SERVICEBUS_TRY_TIMEOUT`) + one dependency call (`AB_WORKER_KUSTO_FLUSH_ATTEMPTS` x "
            "`AB_WORKER_KUSTO_ATTEMPT_TIMEOUT`), 26 s with the defaults: a shorter one restarts healthy pods "
            "during an outage."
        ),
    )
    telemetry: Literal["appinsights", "console", "none"] = Field(
        default="none",
        description="Where spans, metrics and logs go: Application Insights, the console, or nowhere.",
    )
    applicationinsights_connection_string: SecretStr | None = Field(
        default=None,
        validation_alias="APPLICATIONINSIGHTS_CONNECTION_STRING",
        description="Turns Application Insights on (the Azure Monitor distro's standard variable; secret).",
    )
    kusto_ingest_uri: str | None = Field(
        default=None,
        description=(
            "Kusto ingestion endpoint (`https://ingest-<cluster>.<region>.kusto.windows.net`); rows go there "
            "when set, else to `--rows FILE`."
        ),
    )
    kusto_database: str = Field(default="assignments", description="Kusto database (ingestion and `report --kusto`).")
    kusto_table: str = Field(default="AssignmentEvents", description="Kusto table.")
    kusto_query_uri: str | None = Field(
        default=None,
        description="Kusto query endpoint (`https://<cluster>.<region>.kusto.windows.net`) `report --kusto` reads.",
    )
    kusto_mode: Literal["queued", "streaming"] = Field(
        default="queued", description="Ingestion: `queued` (the production default) or `streaming`."
    )
    kusto_max_rows: int = Field(
        default=500,
        ge=1,
        le=100_000,
        description="Flush to Kusto when this many rows are buffered (and by age: `AB_WORKER_FLUSH_MAX_AGE`).",
    )
    flush_max_age: float = Field(
        default=2.0,
        gt=0,
        le=300,
        validation_alias=AliasChoices("AB_WORKER_FLUSH_MAX_AGE", "AB_WORKER_KUSTO_MAX_AGE"),
        description=(
            "Seconds: every record sink (Kusto, `--rows FILE`, or the count-only fallback) flushes when its "
            "oldest buffered row is this old, so a trickle of requests is recorded and settled within this "
            "age instead of waiting for a full batch. The pump cuts a receive's wait to when the held rows "
            "fall due (never below 0.1 s, so on a busy queue the next batch is received and publishing while "
            "they are flushed and settled). `AB_WORKER_KUSTO_MAX_AGE` is its former name."
        ),
    )
    kusto_flush_attempts: int = Field(default=3, ge=1, le=20, description="Tries per flush before the pump holds.")
    kusto_attempt_timeout: float = Field(
        default=5.0,
        gt=0,
        le=600,
        description="Seconds each flush try may take; also the HTTP connect and read timeout of that try.",
    )
    telemetry_sampling_ratio: float | None = Field(
        default=None, ge=0, le=1, description="Fraction of traces kept (default: the distro's 5 traces per second)."
    )
    health_port: int = Field(
        default=8080,
        ge=0,
        le=65535,
        description="Port of `GET /healthz` and `GET /readyz` (0 turns them off; a busy port is logged, not fatal).",
    )
    health_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description=(
            "Address the health endpoints listen on. The image and `deploy/k8s/deployment.yaml` set `0.0.0.0`, "
            "because the kubelet (or Container Apps) probes the pod's IP."
        ),
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level; `--log-level`, before or after the command, wins."
    )

    def with_overrides(self, **changes: object) -> Self:
        """A copy with ``changes`` (command-line flags) over these values; a ``None`` change keeps the value.

        The one way settings change: they are frozen. Flags are checked by their argument types, so the
        copy is not validated again; a name that is not a setting is a ``TypeError``.
        """
        unknown = sorted(set(changes) - set(type(self).model_fields))
        if unknown:
            raise TypeError(f"not settings: {', '.join(unknown)}")
        return self.model_copy(update={name: value for name, value in changes.items() if value is not None})

    @property
    def liveness_floor(self) -> float:
        """The shortest liveness timeout that outlasts one turn of the pump during an outage (seconds).

        A receive (``max_wait``), a link open (bounded by ``servicebus_try_timeout``) and one
        dependency call (``kusto_flush_attempts`` x ``kusto_attempt_timeout``) may all fall in one
        turn; a shorter timeout restarts healthy pods in the middle of an outage.
        """
        return self.max_wait + self.servicebus_try_timeout + self.kusto_flush_attempts * self.kusto_attempt_timeout

    @model_validator(mode="after")
    def _liveness_outlasts_one_turn(self) -> WorkerSettings:
        floor = self.liveness_floor
        if self.liveness_timeout >= floor:
            return self
        why = (
            f"{self.liveness_timeout:g} s is below its floor of {floor:g} s: max_wait ({self.max_wait:g}) + a link "
            f"open (servicebus_try_timeout, {self.servicebus_try_timeout:g}) + one dependency call "
            f"(kusto_flush_attempts x kusto_attempt_timeout, {self.kusto_flush_attempts} x "
            f"{self.kusto_attempt_timeout:g}); a shorter one restarts healthy pods during an outage"
        )
        # Raised against the field, so that the error names AB_WORKER_LIVENESS_TIMEOUT.
        error = InitErrorDetails(
            type=PydanticCustomError("liveness_floor", why),
            loc=("liveness_timeout",),
            input=self.liveness_timeout,
        )
        raise ValidationError.from_exception_data(type(self).__name__, [error])

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
