"""The broker contract, as the brokers import it: it lives in the engine
(:mod:`deliverylab.engine.broker`), which uses it; these names stay here for older imports."""

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
           "Delivery", "Received", "check_delivery", "check_send", "encode_payload"]
