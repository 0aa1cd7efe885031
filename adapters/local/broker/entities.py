"""Queues, topics, subscriptions and dead-letter sub-queues, with their lock bookkeeping.

Everything here is plain data and runs on the broker's event thread only, so there is no locking.
Each operation is O(log n) or better in the queue length: ready messages sit in a heap of sequence
numbers, locks in a dict keyed by delivery tag with a heap of expiry times (stale heap entries are
skipped when popped), so nothing ever scans a queue per message.
"""

from __future__ import annotations

import heapq
import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .config import BrokerConfig, EntityProperties, QueueConfig, TopicConfig
from .filters import Predicate, compile_rules
from .messages import STATE_ACTIVE, STATE_DEFERRED, StoredMessage

DEAD_LETTER_SUFFIX = "/$deadletterqueue"
MAX_DELIVERY_REASON = "MaxDeliveryCountExceeded"
TTL_EXPIRED_REASON = "TTLExpiredException"

# Lock tokens must stay unique across broker restarts that share state, hence a random prefix.
# Tags are ASCII: proton's Python binding decodes delivery tags as UTF-8 text when read back.
_TAG_PREFIX = os.urandom(4).hex()
_tag_counter = itertools.count(1)


@dataclass(slots=True)
class SendFault:
    """An injected refusal of transfers to one entity (``LocalBroker.refuse_sends``)."""

    #: The AMQP error condition, e.g. ``com.microsoft:server-busy``.
    condition: str
    description: str
    #: Transfers left to refuse; None: until cleared.
    left: int | None


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch, the unit of every AMQP timestamp."""
    return int(time.time() * 1000)


def new_lock_tag() -> bytes:
    """A fresh 16-byte delivery tag, which the SDK reads as the lock token UUID (bytes_le)."""
    return f"{_TAG_PREFIX}{next(_tag_counter) & 0xFFFFFFFF:08x}".encode("ascii")


class MessageStore:
    """The receivable side of an entity: a queue, a subscription, or a dead-letter sub-queue."""

    def __init__(self, path: str, props: EntityProperties, dead_letter: MessageStore | None) -> None:
        self.path = path
        self.props = props
        self.lock_ms = int(props.lock_duration * 1000)
        self.dead_letter = dead_letter
        self.messages: dict[int, StoredMessage] = {}
        self.locks: dict[bytes, StoredMessage] = {}
        self.deferred = 0
        self._ready: list[int] = []
        self._lock_heap: list[tuple[int, bytes]] = []
        self._expiry_heap: list[tuple[int, int]] = []
        # Set by the server: called whenever a message becomes receivable.
        self.on_ready: Callable[[MessageStore], None] | None = None

    # -- enqueue / dequeue -------------------------------------------------------------------

    def add(self, msg: StoredMessage) -> None:
        """Store a message and make it receivable."""
        msg.state = STATE_ACTIVE
        msg.lock_tag = None
        self.messages[msg.seq] = msg
        heapq.heappush(self._ready, msg.seq)
        if msg.expires_ms is not None:
            heapq.heappush(self._expiry_heap, (msg.expires_ms, msg.seq))
        if self.on_ready is not None:
            self.on_ready(self)

    def has_ready(self) -> bool:
        """Whether a receivable message may be waiting (cheap; may be a false positive)."""
        return bool(self._ready)

    def next_ready(self, now: int) -> StoredMessage | None:
        """Pop the lowest-sequence receivable message, expiring stale ones on the way."""
        ready = self._ready
        messages = self.messages
        while ready:
            msg = messages.get(heapq.heappop(ready))
            if msg is None or msg.lock_tag is not None or msg.state != STATE_ACTIVE:
                continue
            if msg.expires_ms is not None and msg.expires_ms <= now:
                self._expire(msg)
                continue
            return msg
        return None

    def lock(self, msg: StoredMessage, now: int) -> bytes:
        """Lock a message for a PEEK_LOCK receiver and return the delivery tag (lock token)."""
        tag = new_lock_tag()
        msg.lock_tag = tag
        msg.locked_until_ms = now + self.lock_ms
        self.locks[tag] = msg
        heapq.heappush(self._lock_heap, (msg.locked_until_ms, tag))
        return tag

    def remove(self, msg: StoredMessage) -> None:
        """Delete a message (RECEIVE_AND_DELETE delivery or completion)."""
        if self.messages.pop(msg.seq, None) is not None and msg.state == STATE_DEFERRED:
            self.deferred -= 1
        if msg.lock_tag is not None:
            self.locks.pop(msg.lock_tag, None)
            msg.lock_tag = None

    # -- settlement --------------------------------------------------------------------------

    def locked(self, tag: bytes, now: int) -> StoredMessage | None:
        """The message held under ``tag`` if its lock is still valid."""
        msg = self.locks.get(tag)
        if msg is None or msg.locked_until_ms <= now:
            return None
        return msg

    def complete(self, tag: bytes, now: int) -> bool:
        """Complete (delete) a locked message; ``False`` means the lock was lost."""
        msg = self.locked(tag, now)
        if msg is None:
            return False
        self.remove(msg)
        return True

    def abandon(self, tag: bytes, now: int, *, count_delivery: bool = True) -> bool:
        """Release a lock; an abandon counts as a delivery attempt, a release does not."""
        msg = self.locked(tag, now)
        if msg is None:
            return False
        self._unlock(msg, count_delivery=count_delivery)
        return True

    def defer(self, tag: bytes, now: int) -> bool:
        """Set a locked message aside; only receive-by-sequence-number can fetch it again."""
        msg = self.locked(tag, now)
        if msg is None:
            return False
        self.locks.pop(tag, None)
        msg.lock_tag = None
        if msg.state != STATE_DEFERRED:
            msg.state = STATE_DEFERRED
            self.deferred += 1
        return True

    def dead_letter_locked(self, tag: bytes, now: int, reason: str | None, desc: str | None) -> bool:
        """Move a locked message to the dead-letter sub-queue."""
        msg = self.locked(tag, now)
        if msg is None:
            return False
        self.move_to_dead_letter(msg, reason, desc)
        return True

    def move_to_dead_letter(self, msg: StoredMessage, reason: str | None, desc: str | None) -> None:
        """Move any message of this store to its dead-letter sub-queue (or drop it if none)."""
        self.remove(msg)
        if self.dead_letter is None:
            return
        updates: dict[str, str] = {}
        if reason is not None:
            updates["DeadLetterReason"] = reason
        if desc is not None:
            updates["DeadLetterErrorDescription"] = desc
        if updates:
            msg.set_application_properties(updates)
        msg.dead_letter_source = self.path
        # Dead-lettered messages stay until someone removes them, whatever their time-to-live.
        msg.expires_ms = None
        self.dead_letter.add(msg)

    def renew(self, tag: bytes, now: int) -> int | None:
        """Extend a lock; returns the new locked-until (ms) or ``None`` if the lock was lost."""
        msg = self.locked(tag, now)
        if msg is None:
            return None
        msg.locked_until_ms = now + self.lock_ms
        heapq.heappush(self._lock_heap, (msg.locked_until_ms, tag))
        return msg.locked_until_ms

    def _unlock(self, msg: StoredMessage, *, count_delivery: bool) -> None:
        if msg.lock_tag is not None:
            self.locks.pop(msg.lock_tag, None)
            msg.lock_tag = None
        if count_delivery:
            msg.delivery_count += 1
            if msg.delivery_count >= self.props.max_delivery_count and self.dead_letter is not None:
                self.move_to_dead_letter(
                    msg,
                    MAX_DELIVERY_REASON,
                    f"Message could not be consumed after {self.props.max_delivery_count} delivery attempts.",
                )
                return
        if msg.state == STATE_DEFERRED:
            return
        heapq.heappush(self._ready, msg.seq)
        if self.on_ready is not None:
            self.on_ready(self)

    def _expire(self, msg: StoredMessage) -> None:
        if self.props.dead_lettering_on_message_expiration and self.dead_letter is not None:
            self.move_to_dead_letter(msg, TTL_EXPIRED_REASON, "The message expired and was dead lettered.")
        else:
            self.remove(msg)

    def expire_locks(self, now: int) -> None:
        """Return messages whose lock ran out, counting the failed delivery."""
        heap = self._lock_heap
        while heap and heap[0][0] <= now:
            until, tag = heapq.heappop(heap)
            msg = self.locks.get(tag)
            # A renewed lock left an older heap entry behind; only the current expiry counts.
            if msg is not None and msg.locked_until_ms == until:
                self._unlock(msg, count_delivery=True)

    def expire_messages(self, now: int) -> None:
        """Expire (or dead-letter) waiting messages whose time-to-live has passed.

        Locked messages expire when their lock ends, as on the service; deferred ones are kept.
        """
        heap = self._expiry_heap
        while heap and heap[0][0] <= now:
            expires, seq = heapq.heappop(heap)
            msg = self.messages.get(seq)
            if msg is None or msg.expires_ms != expires:
                continue
            if msg.lock_tag is None and msg.state == STATE_ACTIVE:
                self._expire(msg)

    # -- management operations ---------------------------------------------------------------

    def receive_deferred(
        self, seqs: Iterable[int], now: int, *, lock: bool
    ) -> list[tuple[StoredMessage, bytes | None]] | None:
        """Fetch deferred messages by sequence number; ``None`` if any is not deferred."""
        found = [self.messages.get(seq) for seq in seqs]
        if any(m is None or m.state != STATE_DEFERRED or m.lock_tag is not None for m in found):
            return None
        result: list[tuple[StoredMessage, bytes | None]] = []
        for msg in found:
            assert msg is not None
            if lock:
                result.append((msg, self.lock(msg, now)))
            else:
                self.remove(msg)
                result.append((msg, None))
        return result

    def peek(self, from_seq: int, count: int) -> list[StoredMessage]:
        """Messages with sequence number >= ``from_seq`` in order, without locking them."""
        seqs = heapq.nsmallest(count, (s for s in self.messages if s >= from_seq))
        return [self.messages[s] for s in seqs]

    def counts(self) -> dict[str, int]:
        """Message counts; ``active`` includes locked messages, as Service Bus reports it."""
        return {
            "active": len(self.messages) - self.deferred,
            "locked": len(self.locks),
            "deferred": self.deferred,
            "dead_letter": len(self.dead_letter.messages) if self.dead_letter else 0,
            "scheduled": 0,
        }


class SendTarget:
    """The sendable side of a queue or topic: sequencing, scheduling and duplicate detection."""

    def __init__(self, name: str, props: EntityProperties) -> None:
        self.name = name
        self.props = props
        self.next_seq = 1
        self.scheduled: dict[int, StoredMessage] = {}
        self._schedule_heap: list[tuple[int, int]] = []
        self._seen_ids: dict[str, int] = {}
        self._seen_order: deque[tuple[int, str]] = deque()

    def _is_duplicate(self, msg: StoredMessage, now: int) -> bool:
        if not self.props.requires_duplicate_detection:
            return False
        message_id = msg.message_id
        if message_id is None:
            return False
        key = str(message_id)
        order = self._seen_order
        while order and order[0][0] <= now:
            expiry, old = order.popleft()
            if self._seen_ids.get(old) == expiry:
                del self._seen_ids[old]
        if self._seen_ids.get(key, 0) > now:
            return True
        expiry = now + int(self.props.duplicate_detection_window * 1000)
        self._seen_ids[key] = expiry
        order.append((expiry, key))
        return False

    def accept(self, msg: StoredMessage, now: int) -> int | None:
        """Take a sent message; returns its sequence number, or ``None`` if it was a duplicate."""
        if self._is_duplicate(msg, now):
            return None
        msg.seq = self.next_seq
        self.next_seq += 1
        if msg.scheduled_ms is not None and msg.scheduled_ms > now:
            self.scheduled[msg.seq] = msg
            heapq.heappush(self._schedule_heap, (msg.scheduled_ms, msg.seq))
        else:
            self._deliver(msg, now)
        return msg.seq

    def cancel_scheduled(self, seq: int) -> bool:
        """Cancel a scheduled message; ``False`` if it is not (or no longer) scheduled."""
        return self.scheduled.pop(seq, None) is not None

    def promote_due(self, now: int) -> None:
        """Enqueue scheduled messages whose time has come."""
        heap = self._schedule_heap
        while heap and heap[0][0] <= now:
            _, seq = heapq.heappop(heap)
            msg = self.scheduled.pop(seq, None)
            if msg is not None:
                self._deliver(msg, now)

    def _deliver(self, msg: StoredMessage, now: int) -> None:
        msg.enqueued_ms = now
        ttl = msg.ttl_ms
        if ttl is None and self.props.default_message_ttl is not None:
            ttl = int(self.props.default_message_ttl * 1000)
        msg.expires_ms = now + ttl if ttl else None
        self._route(msg)

    def _route(self, msg: StoredMessage) -> None:
        raise NotImplementedError


class Queue(SendTarget):
    """A queue: one store receives every message."""

    def __init__(self, config: QueueConfig) -> None:
        super().__init__(config.name, config.properties)
        path = config.name.lower()
        dlq = MessageStore(path + DEAD_LETTER_SUFFIX, config.properties, None)
        self.store = MessageStore(path, config.properties, dlq)

    def _route(self, msg: StoredMessage) -> None:
        self.store.add(msg)


class Subscription:
    """A topic subscription: a store plus the compiled rule predicate."""

    def __init__(self, topic: str, name: str, props: EntityProperties, match: Predicate | None):
        path = f"{topic.lower()}/subscriptions/{name.lower()}"
        self.name = name
        self.match = match
        self.store = MessageStore(path, props, MessageStore(path + DEAD_LETTER_SUFFIX, props, None))


class Topic(SendTarget):
    """A topic: fans each message out to every subscription whose rules match."""

    def __init__(self, config: TopicConfig) -> None:
        super().__init__(config.name, config.properties)
        self.subscriptions = [
            Subscription(
                config.name,
                sub.name,
                sub.properties,
                compile_rules(sub.rules, f"{config.name}/Subscriptions/{sub.name}"),
            )
            for sub in config.subscriptions
        ]

    def _route(self, msg: StoredMessage) -> None:
        targets = [s for s in self.subscriptions if s.match is None or s.match(msg)]
        # Copies are made before any store sees the message: adding may deliver and lock it.
        copies = [msg] + [msg.copy() for _ in targets[1:]] if targets else []
        for sub, copy in zip(targets, copies, strict=True):
            sub_ttl = sub.store.props.default_message_ttl
            if sub_ttl is not None and msg.ttl_ms is None:
                limit = msg.enqueued_ms + int(sub_ttl * 1000)
                copy.expires_ms = limit if copy.expires_ms is None else min(copy.expires_ms, limit)
            sub.store.add(copy)


def normalize_address(address: str | None) -> str:
    """Reduce a link address (``amqps://host/queue``, ``/queue``, ``queue``) to a lower-case path."""
    if not address:
        return ""
    text = address
    if "://" in text:
        text = text.split("://", 1)[1]
        text = text.split("/", 1)[1] if "/" in text else ""
    return text.strip("/").lower()


class BrokerState:
    """All entities and their messages; survives a broker restart when passed to the new broker."""

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.targets: dict[str, SendTarget] = {}
        self.stores: dict[str, MessageStore] = {}
        #: Fault injection: entity → the refusal to answer its transfers with.
        self.send_faults: dict[str, SendFault] = {}
        for queue_config in config.queues:
            queue = Queue(queue_config)
            self.targets[queue.name.lower()] = queue
            self._register(queue.store)
        for topic_config in config.topics:
            topic = Topic(topic_config)
            self.targets[topic.name.lower()] = topic
            for sub in topic.subscriptions:
                self._register(sub.store)

    def _register(self, store: MessageStore) -> None:
        self.stores[store.path] = store
        if store.dead_letter is not None:
            self.stores[store.dead_letter.path] = store.dead_letter

    def send_fault(self, target: SendTarget) -> tuple[str, str] | None:
        """The (condition, description) to refuse the next transfer to ``target`` with, if one is injected."""
        fault = self.send_faults.get(target.name.lower())
        if fault is None:
            return None
        if fault.left is not None:
            if fault.left <= 1:
                del self.send_faults[target.name.lower()]
            else:
                fault.left -= 1
        return fault.condition, fault.description

    def all_stores(self) -> Iterable[MessageStore]:
        """Every store, dead-letter sub-queues included."""
        return self.stores.values()

    def tick(self, now: int) -> None:
        """Run time-based work: lock expiry and scheduled enqueues."""
        for target in self.targets.values():
            if target.scheduled:
                target.promote_due(now)
        for store in self.stores.values():
            store.expire_locks(now)
            store.expire_messages(now)

    def counts(self, entity: str) -> dict[str, int]:
        """Counts for a queue, topic (summed over subscriptions) or subscription path."""
        path = normalize_address(entity)
        target = self.targets.get(path)
        if isinstance(target, Queue):
            result = target.store.counts()
            result["scheduled"] = len(target.scheduled)
            return result
        if isinstance(target, Topic):
            total = {"active": 0, "locked": 0, "deferred": 0, "dead_letter": 0, "scheduled": 0}
            for sub in target.subscriptions:
                for key, value in sub.store.counts().items():
                    total[key] += value
            total["scheduled"] = len(target.scheduled)
            return total
        store = self.stores.get(path)
        if store is None:
            raise KeyError(f"unknown entity {entity!r}")
        return store.counts()
