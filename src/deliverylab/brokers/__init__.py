"""Brokers: where messages wait. ``base`` is the contract every engine implements; one module
per engine (``sqlite``: the queue table)."""
