"""Entity configuration in the shape of the official Service Bus emulator's ``Config.json``.

Only the fields the local broker acts on are interpreted; everything else is accepted and ignored
(fields known to change semantics, such as ``RequiresSession`` or ``ForwardTo``, log a warning) so a
config written for the official emulator loads unchanged.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

_LOG = logging.getLogger(__name__)

DEFAULT_QUEUE = "assignment-requests"
#: Where a publisher asks for its events in the request/reply pattern (``publish --reply-to``).
DEFAULT_REPLY_QUEUE = "assignment-replies"
DEFAULT_TOPIC = "assignment-events"
DEFAULT_SUBSCRIPTIONS = ("all", "audit")

# The emulator's spelling of "never expires" (TimeSpan.MaxValue) is far beyond anything useful.
_MAX_TTL_SECONDS = 10675199 * 86400.0

_DURATION = re.compile(
    r"^P(?:(?P<days>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<hours>\d+(?:\.\d+)?)H)?(?:(?P<minutes>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?$"
)

_UNSUPPORTED_PROPERTIES = (
    "RequiresSession",
    "ForwardTo",
    "ForwardDeadLetteredMessagesTo",
    "EnableBatchedOperations",
)


class BrokerConfigError(ValueError):
    """A broker configuration is invalid; the message names the source and the field."""


def parse_duration(text: object) -> float:
    """Parse an ISO-8601 duration such as ``PT30S`` or ``P14D`` into seconds."""
    match = _DURATION.match(text.strip().upper()) if isinstance(text, str) else None
    if not match or not isinstance(text, str) or text.strip().upper() in ("P", "PT"):
        raise ValueError(f"not an ISO-8601 duration: {text!r}")
    parts = {k: float(v) for k, v in match.groupdict().items() if v is not None}
    return (
        parts.get("days", 0.0) * 86400
        + parts.get("hours", 0.0) * 3600
        + parts.get("minutes", 0.0) * 60
        + parts.get("seconds", 0.0)
    )


@dataclass(frozen=True)
class EntityProperties:
    """Behavioural properties of a queue, topic or subscription."""

    max_delivery_count: int = 10
    lock_duration: float = 60.0
    dead_lettering_on_message_expiration: bool = False
    requires_duplicate_detection: bool = False
    duplicate_detection_window: float = 20.0
    default_message_ttl: float | None = None


@dataclass(frozen=True)
class RuleConfig:
    """A subscription rule: a SQL filter expression or a correlation filter."""

    name: str
    sql: str | None = None
    correlation: dict[str, object] | None = None


@dataclass(frozen=True)
class SubscriptionConfig:
    """A topic subscription with its rules (no rules means every message matches)."""

    name: str
    properties: EntityProperties = field(default_factory=EntityProperties)
    rules: tuple[RuleConfig, ...] = ()


@dataclass(frozen=True)
class QueueConfig:
    """A queue."""

    name: str
    properties: EntityProperties = field(default_factory=EntityProperties)


@dataclass(frozen=True)
class TopicConfig:
    """A topic and its subscriptions."""

    name: str
    properties: EntityProperties = field(default_factory=EntityProperties)
    subscriptions: tuple[SubscriptionConfig, ...] = ()


@dataclass(frozen=True)
class BrokerConfig:
    """The entities one broker serves (one namespace of the emulator config)."""

    namespace: str = "sbemulatorns"
    queues: tuple[QueueConfig, ...] = ()
    topics: tuple[TopicConfig, ...] = ()

    @classmethod
    def default(cls) -> BrokerConfig:
        """The entities the assignment worker uses: its request queue, event topic and a reply queue.

        The same entity names as ``deploy/servicebus-emulator/Config.json`` (a test holds them equal).
        The requests queue detects duplicates over Service Bus's default window (10 minutes), as every
        deployment does: a publisher's retried send, or ``dlq replay``'s second copy of one dead letter,
        is dropped.
        """
        return cls(
            queues=(
                QueueConfig(
                    DEFAULT_QUEUE,
                    EntityProperties(
                        max_delivery_count=10,
                        lock_duration=30.0,
                        requires_duplicate_detection=True,
                        duplicate_detection_window=600.0,
                    ),
                ),
                QueueConfig(DEFAULT_REPLY_QUEUE, EntityProperties(lock_duration=30.0)),
            ),
            topics=(
                TopicConfig(
                    DEFAULT_TOPIC,
                    EntityProperties(requires_duplicate_detection=True),
                    tuple(SubscriptionConfig(name) for name in DEFAULT_SUBSCRIPTIONS),
                ),
            ),
        )

    @classmethod
    def load(cls, path: str | Path) -> BrokerConfig:
        """Load an emulator-style ``Config.json`` file."""
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise BrokerConfigError(f"{source}: cannot read file: {exc}") from exc
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BrokerConfigError(f"{source}: invalid JSON: {exc}") from exc
        return cls.from_dict(document, source=source)

    @classmethod
    def from_dict(cls, document: object, *, source: str = "<dict>") -> BrokerConfig:
        """Build a config from the emulator's JSON structure (``{"UserConfig": {...}}``); anything else is refused."""
        return _Parser(source).parse(document)


class _Parser:
    """Walks the document keeping a field path so every error names where it happened."""

    def __init__(self, source: str) -> None:
        self._source = source

    def _fail(self, path: str, problem: str) -> BrokerConfigError:
        return BrokerConfigError(f"{self._source}: {path}: {problem}")

    def _obj(self, value: object, path: str) -> dict[str, object]:
        if not isinstance(value, dict):
            raise self._fail(path, f"expected an object, got {type(value).__name__}")
        return value

    def _list(self, value: object, path: str) -> list[object]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self._fail(path, f"expected a list, got {type(value).__name__}")
        return value

    def _name(self, item: dict[str, object], path: str) -> str:
        name = item.get("Name")
        if not isinstance(name, str) or not name.strip():
            raise self._fail(f"{path}.Name", "a non-empty string is required")
        if "/" in name or "$" in name:
            raise self._fail(f"{path}.Name", f"invalid entity name {name!r}")
        return name

    def parse(self, document: object) -> BrokerConfig:
        """Validate the whole document and build the config of its first namespace."""
        root = self._obj(document, "(root)")
        user = self._obj(root.get("UserConfig"), "UserConfig")
        namespaces = self._list(user.get("Namespaces"), "UserConfig.Namespaces")
        if not namespaces:
            raise self._fail("UserConfig.Namespaces", "at least one namespace is required")
        if len(namespaces) > 1:
            _LOG.warning("%s: only the first namespace is served", self._source)
        path = "UserConfig.Namespaces[0]"
        ns = self._obj(namespaces[0], path)
        name = ns.get("Name", "sbemulatorns")
        queues = tuple(
            self._queue(q, f"{path}.Queues[{i}]") for i, q in enumerate(self._list(ns.get("Queues"), f"{path}.Queues"))
        )
        topics = tuple(
            self._topic(t, f"{path}.Topics[{i}]") for i, t in enumerate(self._list(ns.get("Topics"), f"{path}.Topics"))
        )
        seen: set[str] = set()
        entities: list[QueueConfig | TopicConfig] = [*queues, *topics]
        for entity in entities:
            key = entity.name.lower()
            if key in seen:
                raise self._fail(path, f"duplicate entity name {entity.name!r}")
            seen.add(key)
        return BrokerConfig(namespace=str(name), queues=queues, topics=topics)

    def _queue(self, value: object, path: str) -> QueueConfig:
        item = self._obj(value, path)
        return QueueConfig(self._name(item, path), self._props(item.get("Properties"), path))

    def _topic(self, value: object, path: str) -> TopicConfig:
        item = self._obj(value, path)
        name = self._name(item, path)
        subs = tuple(
            self._subscription(s, f"{path}.Subscriptions[{i}]")
            for i, s in enumerate(self._list(item.get("Subscriptions"), f"{path}.Subscriptions"))
        )
        return TopicConfig(name, self._props(item.get("Properties"), path), subs)

    def _subscription(self, value: object, path: str) -> SubscriptionConfig:
        item = self._obj(value, path)
        rules = tuple(
            self._rule(r, f"{path}.Rules[{i}]") for i, r in enumerate(self._list(item.get("Rules"), f"{path}.Rules"))
        )
        return SubscriptionConfig(self._name(item, path), self._props(item.get("Properties"), path), rules)

    def _rule(self, value: object, path: str) -> RuleConfig:
        item = self._obj(value, path)
        name = str(item.get("Name", "rule"))
        props = self._obj(item.get("Properties", {}), f"{path}.Properties")
        kind = str(props.get("FilterType", "Sql")).lower()
        if props.get("Action"):
            _LOG.warning("%s: %s.Properties.Action is not supported; ignored", self._source, path)
        if kind == "sql":
            sql = self._obj(props.get("SqlFilter", {}), f"{path}.Properties.SqlFilter")
            expression = sql.get("SqlExpression", "1=1")
            if not isinstance(expression, str):
                raise self._fail(f"{path}.Properties.SqlFilter.SqlExpression", "expected a string")
            return RuleConfig(name, sql=expression)
        if kind == "correlation":
            where = f"{path}.Properties.CorrelationFilter"
            corr = self._obj(props.get("CorrelationFilter", {}), where)
            if corr.get("Properties") is not None:  # application properties to match: name -> value
                self._obj(corr["Properties"], f"{where}.Properties")
            return RuleConfig(name, correlation=dict(corr))
        raise self._fail(f"{path}.Properties.FilterType", f"unknown filter type {kind!r}")

    def _props(self, value: object, path: str) -> EntityProperties:
        if value is None:
            return EntityProperties()
        props = self._obj(value, f"{path}.Properties")
        for key in _UNSUPPORTED_PROPERTIES:
            if props.get(key):
                _LOG.warning("%s: %s.Properties.%s is not supported", self._source, path, key)
        base = EntityProperties()
        return EntityProperties(
            max_delivery_count=self._int(props, "MaxDeliveryCount", path, base.max_delivery_count),
            lock_duration=self._duration(props, "LockDuration", path, base.lock_duration),
            dead_lettering_on_message_expiration=self._bool(props, "DeadLetteringOnMessageExpiration", path, False),
            requires_duplicate_detection=self._bool(props, "RequiresDuplicateDetection", path, False),
            duplicate_detection_window=self._duration(
                props, "DuplicateDetectionHistoryTimeWindow", path, base.duplicate_detection_window
            ),
            default_message_ttl=self._ttl(props, path),
        )

    def _int(self, props: dict[str, object], key: str, path: str, default: int) -> int:
        value = props.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self._fail(f"{path}.Properties.{key}", f"expected a positive integer: {value!r}")
        return value

    def _bool(self, props: dict[str, object], key: str, path: str, default: bool) -> bool:
        value = props.get(key, default)
        if not isinstance(value, bool):
            raise self._fail(f"{path}.Properties.{key}", f"expected true or false: {value!r}")
        return value

    def _duration(self, props: dict[str, object], key: str, path: str, default: float) -> float:
        if key not in props:
            return default
        try:
            seconds = parse_duration(props[key])
        except ValueError as exc:
            raise self._fail(f"{path}.Properties.{key}", str(exc)) from exc
        if seconds <= 0:
            raise self._fail(f"{path}.Properties.{key}", "must be positive")
        return seconds

    def _ttl(self, props: dict[str, object], path: str) -> float | None:
        if props.get("DefaultMessageTimeToLive") is None:
            return None
        seconds = self._duration(props, "DefaultMessageTimeToLive", path, 0.0)
        return None if seconds >= _MAX_TTL_SECONDS else seconds
