"""Brokers: where messages wait. ``base`` is the contract every engine implements; one module
per engine (``sqlite`` and ``postgres``: the queue table; ``rabbitmq``; ``jetstream``);
``registry`` opens an engine by URL."""
