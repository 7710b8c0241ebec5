"""deliverylab: a real SQLite queue for learning message delivery guarantees."""

__version__ = "0.1.0"
