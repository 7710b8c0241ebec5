"""Brokers: where messages wait. ``base`` is the contract every engine implements; one module
per engine (``sqlite`` and ``postgres``: the queue table; ``rabbitmq``; ``jetstream``);
``registry`` opens a store and a broker from what a user types (a file or a URL)."""
