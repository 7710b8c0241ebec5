"""The engine: what a consumer runs, on any broker. The store (the consumer's own database:
orders, inbox, projection, fence, trace), the worker, orders, the checker, reconcile, faults,
clock and ids."""
