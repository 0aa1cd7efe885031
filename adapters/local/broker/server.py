"""The proton event handlers: connections, links, transfers and dispositions.

Proton drives AMQP framing, SASL and flow control in C; these handlers only route link endpoints to
entities and move stored messages on and off links. Everything runs on the broker's event-loop thread.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar, cast  # Any: an AMQP error condition's info map, as proton decodes it

from proton import (
    Condition,
    Connection,
    Delivery,
    Disposition,
    Endpoint,
    Event,
    Handler,
    Link,
    Message,
    Terminus,
)

from . import management
from .codec import CodecError
from .entities import BrokerState, MessageStore, SendTarget, normalize_address, now_ms
from .messages import parse_message, split_batch

_LOG = logging.getLogger(__name__)

TICK_SECONDS = 0.05
# Credit granted to client senders; refilled when half is used so producers never stall.
INCOMING_CREDIT = 1000
NOT_FOUND = "amqp:not-found"
NOT_ALLOWED = "amqp:not-allowed"
_MGMT_SUFFIX = "/$management"
_CBS = "$cbs"


_E = TypeVar("_E")


def _need(value: _E | None) -> _E:
    """Endpoint accessors on events are optional in proton's typing; ours always carry them."""
    if value is None:
        raise RuntimeError("event without the expected endpoint")
    return value


class _Consumer:
    """A broker-side sender link feeding a client receiver from one store."""

    __slots__ = ("link", "presettled", "store")

    def __init__(self, link: Link, store: MessageStore, presettled: bool) -> None:
        self.link = link
        self.store = store
        self.presettled = presettled


class _Producer:
    """A broker-side receiver link taking a client's sends into a queue or topic."""

    __slots__ = ("target",)

    def __init__(self, target: SendTarget) -> None:
        self.target = target


class _Node:
    """A request link to ``$cbs`` or an entity's ``$management`` node."""

    __slots__ = ("address", "store", "target")

    def __init__(self, address: str, store: MessageStore | None, target: SendTarget | None):
        self.address = address
        self.store = store
        self.target = target


class BrokerHandler(Handler):
    """Routes AMQP endpoints to entities; the single owner of :class:`BrokerState` while running."""

    def __init__(self, state: BrokerState) -> None:
        super().__init__()
        self.state = state
        self._consumers: dict[str, list[_Consumer]] = {}
        self._reply_tag = 0
        for store in state.all_stores():
            store.on_ready = self._store_ready

    def tick(self) -> None:
        """Time-based work: lock expiry and scheduled messages."""
        self.state.tick(now_ms())

    def detach_state(self) -> None:
        """Unhook the stores from this handler so a later broker can adopt the state."""
        for store in self.state.all_stores():
            store.on_ready = None
        self._consumers.clear()

    def connection_closed(self, connection: Connection) -> None:
        """The loop closed a client's socket: release its links."""
        self._forget_connection(connection)

    # -- endpoints ---------------------------------------------------------------------------

    def on_connection_remote_open(self, event: Event) -> None:
        """Accept every connection (authentication is not emulated)."""
        conn = _need(event.connection)
        if conn.state & Endpoint.LOCAL_UNINIT:
            conn.container = "localbroker"
            conn.open()

    def on_session_remote_open(self, event: Event) -> None:
        """Accept every session."""
        session = _need(event.session)
        if session.state & Endpoint.LOCAL_UNINIT:
            session.open()

    def on_link_remote_open(self, event: Event) -> None:
        """Bind a new link to an entity, a management node, or refuse it as not found."""
        link = _need(event.link)
        if not link.state & Endpoint.LOCAL_UNINIT:
            return
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.rcv_settle_mode = link.remote_rcv_settle_mode
        raw_address = link.remote_source.address if link.is_sender else link.remote_target.address
        path = normalize_address(raw_address)
        try:
            self._attach(link, path)
        except _Refused as refusal:
            _LOG.info("refusing link to %r: %s", raw_address, refusal.description)
            # A null terminus on the answering attach makes the SDK treat the link as rejected and
            # surface the detach error (not-found) instead of starting to send on it.
            if link.is_sender:
                link.source.type = Terminus.UNSPECIFIED
            else:
                link.target.type = Terminus.UNSPECIFIED
            link.condition = Condition(refusal.condition, refusal.description)
            link.open()
            link.close()

    def _attach(self, link: Link, path: str) -> None:
        if path == _CBS or path.endswith(_MGMT_SUFFIX):
            node = self._node(path)
            if link.is_sender:
                _reply_links(link.session.connection)[path] = link
                link.ctx = node
                link.open()
            else:
                link.ctx = node
                link.open()
                link.flow(INCOMING_CREDIT)
            return
        if link.is_sender:
            store = self.state.stores.get(path)
            if store is None:
                raise _Refused(NOT_FOUND, self._missing(path))
            consumer = _Consumer(link, store, link.remote_snd_settle_mode == Link.SND_SETTLED)
            link.ctx = consumer
            self._consumers.setdefault(store.path, []).append(consumer)
            link.open()
            return
        target = self.state.targets.get(path)
        if target is None:
            if path in self.state.stores:
                raise _Refused(NOT_ALLOWED, f"Cannot send to '{path}'.")
            raise _Refused(NOT_FOUND, self._missing(path))
        link.ctx = _Producer(target)
        link.open()
        link.flow(INCOMING_CREDIT)

    def _node(self, path: str) -> _Node:
        if path == _CBS:
            return _Node(path, None, None)
        entity = path[: -len(_MGMT_SUFFIX)]
        store = self.state.stores.get(entity)
        target = self.state.targets.get(entity)
        if store is None and target is None:
            raise _Refused(NOT_FOUND, self._missing(entity))
        return _Node(path, store, target)

    def _missing(self, path: str) -> str:
        return (
            f"The messaging entity 'sb://{self.state.config.namespace}/{path}' could not be "
            "found. To know more visit https://aka.ms/sbResourceMgrExceptions."
        )

    def on_link_remote_close(self, event: Event) -> None:
        """Forget the link and close our end."""
        link = _need(event.link)
        self._forget(link)
        if link.state & Endpoint.LOCAL_ACTIVE:
            link.close()

    def on_session_remote_close(self, event: Event) -> None:
        """Close our end of the session."""
        session = _need(event.session)
        if session.state & Endpoint.LOCAL_ACTIVE:
            session.close()

    def on_connection_remote_close(self, event: Event) -> None:
        """Close our end of the connection."""
        conn = _need(event.connection)
        self._forget_connection(conn)
        if conn.state & Endpoint.LOCAL_ACTIVE:
            conn.close()

    def _forget_connection(self, conn: Connection) -> None:
        link = conn.link_head(0)
        while link is not None:
            self._forget(link)
            link = link.next(0)
        _reply_links(conn).clear()

    def _forget(self, link: Link) -> None:
        ctx = getattr(link, "ctx", None)
        if isinstance(ctx, _Consumer):
            consumers = self._consumers.get(ctx.store.path)
            if consumers and ctx in consumers:
                consumers.remove(ctx)
            # Locks of unsettled deliveries stay until they expire, as on the service, so a
            # client can still settle them through $management after reconnecting.
        link.ctx = None

    # -- flow and deliveries -----------------------------------------------------------------

    def on_link_flow(self, event: Event) -> None:
        """The client granted credit (or asked to drain): deliver what we have."""
        link = _need(event.link)
        ctx = getattr(link, "ctx", None)
        if isinstance(ctx, _Consumer):
            self._pump(ctx)

    def _store_ready(self, store: MessageStore) -> None:
        consumers = self._consumers.get(store.path)
        if not consumers:
            return
        for consumer in list(consumers):
            if not store.has_ready():
                return
            # Competing receivers take turns: whoever was just served moves to the back.
            if self._pump(consumer) and len(consumers) > 1:
                consumers.remove(consumer)
                consumers.append(consumer)

    def _pump(self, consumer: _Consumer) -> int:
        """Deliver ready messages up to the link's credit; returns how many were sent."""
        link = consumer.link
        credit = link.credit
        granted = credit
        store = consumer.store
        if credit > 0 and store.has_ready():
            now = now_ms()
            presettled = consumer.presettled
            while credit > 0:
                msg = store.next_ready(now)
                if msg is None:
                    break
                if presettled:
                    store.remove(msg)
                    delivery = _new_delivery(link, store_tag(msg.seq))
                    link.send(msg.encode(None))
                    link.advance()
                    delivery.settle()
                else:
                    tag = store.lock(msg, now)
                    _new_delivery(link, tag)
                    link.send(msg.encode(tag))
                    link.advance()
                credit -= 1
        if link.drain_mode and link.credit > 0:
            link.drained()
        return granted - credit if granted > 0 else 0

    def on_delivery(self, event: Event) -> None:
        """A transfer from a client sender, or a disposition from a client receiver."""
        delivery = _need(event.delivery)
        link = _need(event.link)
        if link.is_receiver:
            self._incoming(link, delivery)
        else:
            self._disposition(link, delivery)

    def _incoming(self, link: Link, delivery: Delivery) -> None:
        if delivery.aborted:
            delivery.settle()
            return
        if delivery.partial or not delivery.readable:
            return
        data = link.recv(delivery.pending)
        link.advance()
        ctx = getattr(link, "ctx", None)
        if isinstance(ctx, _Producer):
            self._accept_send(ctx.target, delivery, data)
        elif isinstance(ctx, _Node):
            self._request(link, ctx, data)
            delivery.update(Delivery.ACCEPTED)
            delivery.settle()
        else:
            delivery.settle()
        if link.credit < INCOMING_CREDIT // 2 and link.state & Endpoint.LOCAL_ACTIVE:
            link.flow(INCOMING_CREDIT - link.credit)

    def _accept_send(self, target: SendTarget, delivery: Delivery, data: bytes | None) -> None:
        now = now_ms()
        fault = self.state.send_fault(target)
        if fault is not None:
            # With the info map present: the SDK indexes the error's third field and crashes without it.
            delivery.local.condition = Condition(*fault, info={"injected": True})
            delivery.update(Delivery.REJECTED)
            delivery.settle()
            return
        try:
            raw = data or b""
            for inner in split_batch(raw) or [raw]:
                target.accept(parse_message(inner), now)
        except CodecError as exc:
            delivery.local.condition = Condition("amqp:decode-error", str(exc), info={"entity": target.name})
            delivery.update(Delivery.REJECTED)
        else:
            delivery.update(Delivery.ACCEPTED)
        delivery.settle()

    def _request(self, link: Link, node: _Node, data: bytes | None) -> None:
        request = Message()
        try:
            request.decode(data or b"")
        except Exception as exc:  # proton raises its own exception family for bad input
            _LOG.warning("undecodable request on %s: %r", node.address, exc)
            return
        if node.address == _CBS:
            reply = management.cbs_reply(request)
        else:
            reply = management.handle(request, node.store, node.target, now_ms())
        reply_to = normalize_address(request.reply_to) if request.reply_to else node.address
        replies = _reply_links(link.session.connection)
        out = replies.get(reply_to) or replies.get(node.address)
        if out is None:
            _LOG.warning("no reply link for %s", node.address)
            return
        self._reply_tag += 1
        delivery = out.delivery(str(self._reply_tag))
        out.send(reply.encode())
        out.advance()
        delivery.settle()

    def _disposition(self, link: Link, delivery: Delivery) -> None:
        ctx = getattr(link, "ctx", None)
        if not delivery.updated and not delivery.settled:
            return
        if not isinstance(ctx, _Consumer) or ctx.presettled:
            delivery.settle()
            return
        outcome = delivery.remote_state
        remote = delivery.remote
        ok = _apply_outcome(ctx.store, delivery.tag.encode("ascii"), outcome, remote, now_ms())
        if ok is None:
            if delivery.settled:
                delivery.settle()
            return
        if not delivery.settled:
            # rcv-settle-mode second: the SDK waits for us to settle with the outcome we applied.
            if ok:
                if outcome == Delivery.MODIFIED:
                    delivery.local.failed = bool(remote.failed)
                    delivery.local.undeliverable = bool(remote.undeliverable)
                delivery.update(outcome)
            else:
                delivery.local.condition = Condition(
                    management.LOCK_LOST, "The lock supplied is invalid or has expired."
                )
                delivery.update(Delivery.REJECTED)
        delivery.settle()


def _apply_outcome(store: MessageStore, tag: bytes, outcome: int, remote: Disposition, now: int) -> bool | None:
    """Apply a client's outcome to a locked message: ``False`` if the lock was lost, ``None`` if
    the disposition carried no terminal outcome."""
    if outcome == Delivery.ACCEPTED:
        return store.complete(tag, now)
    if outcome == Delivery.REJECTED:
        reason, desc = _dead_letter_details(remote.condition)
        return store.dead_letter_locked(tag, now, reason, desc)
    if outcome == Delivery.RELEASED:
        return store.abandon(tag, now, count_delivery=False)
    if outcome == Delivery.MODIFIED:
        if remote.undeliverable:
            return store.defer(tag, now)
        return store.abandon(tag, now, count_delivery=bool(remote.failed))
    return None


def _reply_links(conn: Connection) -> dict[str, Link]:
    """Per-connection reply links by node address (kept in the connection's proton record)."""
    links: dict[str, Link] | None = getattr(conn, "reply_links", None)
    if links is None:
        links = {}
        conn.reply_links = links
    return links


def _new_delivery(link: Link, tag: bytes) -> Delivery:
    """Start a delivery with a bytes tag (proton accepts bytes; its annotations say str)."""
    return link.delivery(cast(str, tag))


def store_tag(seq: int) -> bytes:
    """Delivery tag for a pre-settled (RECEIVE_AND_DELETE) delivery; no lock token is implied."""
    return f"{seq:016x}".encode("ascii")


def _dead_letter_details(condition: Condition | None) -> tuple[str | None, str | None]:
    if condition is None:
        return None, None
    info = condition.info if isinstance(condition.info, dict) else {}
    details = {str(k): v for k, v in cast(dict[Any, Any], info).items()}
    reason = details.get("DeadLetterReason")
    desc = details.get("DeadLetterErrorDescription", condition.description)
    return (
        None if reason is None else str(reason),
        None if desc is None else str(desc),
    )


class _Refused(Exception):
    """A link attach the broker answers with an error condition."""

    def __init__(self, condition: str, description: str) -> None:
        super().__init__(description)
        self.condition = condition
        self.description = description
