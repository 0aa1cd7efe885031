"""An embedded Azure Service Bus stand-in: an AMQP 1.0 server the real azure-servicebus SDK uses.

Start one with ``LocalBroker().start()`` (or ``with LocalBroker() as broker:``) and connect with
``broker.connection_string``, the emulator form (``...;UseDevelopmentEmulator=true``) with which the
SDK speaks plain AMQP to 127.0.0.1.

Supported (what the worker and its tools use):

* SASL ANONYMOUS; CBS ``put-token`` on ``$cbs`` accepts any token (status 202).
* Queues, topics fanning out to subscriptions, ``$DeadLetterQueue`` sub-queues; entities from an
  emulator-style ``Config.json`` (:class:`BrokerConfig`).
* Subscription rules: correlation filters, and SQL filters that are ``AND``-ed equalities on
  application or ``sys.`` properties (see :mod:`.filters`); other SQL logs a warning and matches all.
* Single and batched sends (the SDK's batch envelope, detected by content because proton does not
  expose the transfer's message-format), messages larger than one frame.
* PEEK_LOCK with lock tokens (delivery tag), lock expiry and redelivery, delivery counts,
  ``MaxDeliveryCountExceeded`` dead-lettering, message time-to-live (dropped or dead-lettered with
  ``TTLExpiredException``), duplicate detection by message-id, RECEIVE_AND_DELETE, credit-based flow.
* Settlement on the link (complete, abandon, dead-letter with reason/description, defer, release)
  answering in the service's dialect (a lost lock is ``com.microsoft:message-lock-lost``), and
  ``$management``: update-disposition, renew-lock, peek-message, receive-by-sequence-number,
  schedule-message, cancel-scheduled-message.
* Unknown entities refused with ``amqp:not-found`` (``MessagingEntityNotFoundError``).
* Fault injection (:meth:`LocalBroker.drop_connections`) and restarts over the same state.

Not supported: sessions (``RequiresSession``), auto-forwarding, rule actions and rule management
operations (add/remove/enumerate rules), transactions, the HTTP administration API, authentication
(every token is accepted), TLS and WebSockets, partitioned entities, persistence beyond the process.
"""

from .broker import LocalBroker
from .config import (
    BrokerConfig,
    BrokerConfigError,
    EntityProperties,
    QueueConfig,
    RuleConfig,
    SubscriptionConfig,
    TopicConfig,
)
from .entities import BrokerState

__all__ = [
    "BrokerConfig",
    "BrokerConfigError",
    "BrokerState",
    "EntityProperties",
    "LocalBroker",
    "QueueConfig",
    "RuleConfig",
    "SubscriptionConfig",
    "TopicConfig",
]
