"""The broker contract, as the brokers import it: it lives in the engine
(:mod:`deliverylab.engine.broker`), which uses it; these names stay here for older imports.

Beside it, what each engine's module answers to the registry (:mod:`.registry`) about a URL
without opening a broker: the lease it fixes (:class:`UrlLease`) and what ``deliverylab
cleanup`` would remove (:class:`Removal`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..engine.broker import (
    MAX_VISIBILITY_TIMEOUT_S,
    NO_MESSAGE_ID,
    Broker,
    BrokerGone,
    Capabilities,
    Delivery,
    Received,
    check_delivery,
    check_send,
    encode_payload,
)

__all__ = ["MAX_VISIBILITY_TIMEOUT_S", "NO_MESSAGE_ID", "Broker", "BrokerGone", "Capabilities",
           "Delivery", "Received", "Removal", "UrlLease", "check_delivery", "check_send",
           "encode_payload"]


@dataclass(frozen=True)
class UrlLease:
    """The lease every receive gets on a broker whose engine fixes it per queue
    (``capabilities.fixed_lease``), as its URL sets it: ``seconds``; the URL ``option`` that
    sets it; whether the URL ``given`` it (else it is the engine's default); what the lease
    is on that engine, in words (``what``); and how a start line shows it (``shown``)."""

    seconds: float
    option: str
    given: bool
    what: str
    shown: str


@dataclass
class Removal:
    """What a store or broker value names, found: ``what`` it is, in words; ``remove`` to
    remove it (None: nothing is there to remove); the ``parts`` that go with it."""

    what: str
    remove: Callable[[], None] | None = None
    parts: list[str] = field(default_factory=list)
