"""A worker's settings: one frozen, validated object, each default written once.

``WorkerSettings()`` is the lab's worker; ``WorkerSettings(mode="at-least-once")`` changes one
field; ``settings.replace(name="worker-2")`` derives another. A bad value raises
:class:`~deliverylab.engine.errors.InvalidInput` naming the field and the value, when the
object is built, so a worker never starts with a setting it cannot honour.

What a worker is given besides its settings is not a setting: the store, the broker and the
clock it runs on, the effect (``handler``) and its hooks (:mod:`deliverylab.engine.hooks`).
``max_receives`` is not one either: it is the broker's redrive policy, and the broker counts
the receives (:data:`DEFAULT_MAX_RECEIVES` is every broker's default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .errors import InvalidInput, check_id, check_int, check_number
from .faults import NO_FAULTS, Faults

CONSUMER = "inventory"
DEFAULT_MAX_RECEIVES = 5
"""Deliveries of one message before the broker moves it to the dead letters (every broker's
default, as SQS's ``maxReceiveCount`` in a redrive policy)."""
MAX_LEASE_S = 12 * 3600  # the SQS upper bound of a visibility timeout


class Mode(StrEnum):
    AT_MOST_ONCE = "at-most-once"
    AT_LEAST_ONCE = "at-least-once"
    IDEMPOTENT = "idempotent"
    TRANSACTIONAL = "transactional"

    @classmethod
    def parse(cls, value: object) -> Mode:
        if isinstance(value, cls):
            return value
        for mode in cls:
            if value == mode.value:
                return mode
        raise InvalidInput("mode", value, "one of " + ", ".join(m.value for m in cls))


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """How a worker works. ``mode``: the order of receive, effect and ACK (the four modes).
    ``faults``: the fault schedule. ``visibility_timeout``: the lease a receive asks for, in
    seconds. ``max_messages``: deliveries per receive (1 to 1000). ``backoff_base`` and
    ``backoff_cap``: the retry delay after a failure, exponential with full jitter, in
    seconds. ``name``: this worker in the trace and its output. ``consumer``: whose inbox and
    fence it uses. ``work_time``: how long processing takes on the clock (a lease shorter than
    this runs out while the worker is still busy). ``crash_exits``: an injected crash ends the
    process (exit status 70) instead of abandoning the step's leases."""

    mode: Mode = Mode.IDEMPOTENT
    faults: Faults = NO_FAULTS
    visibility_timeout: float = 2.0
    max_messages: int = 1
    backoff_base: float = 0.1
    backoff_cap: float = 10.0
    name: str = "worker-1"
    consumer: str = CONSUMER
    work_time: float = 0.0
    crash_exits: bool = False

    def __post_init__(self) -> None:
        checked: dict[str, Any] = {
            "mode": Mode.parse(self.mode),
            "visibility_timeout": check_number("visibility_timeout", self.visibility_timeout,
                                               minimum=0, maximum=MAX_LEASE_S),
            "max_messages": check_int("max_messages", self.max_messages, minimum=1,
                                      maximum=1000),
            "backoff_base": check_number("backoff_base", self.backoff_base, minimum=0),
            "name": check_id("name", self.name),
            "consumer": check_id("consumer", self.consumer),
            "work_time": check_number("work_time", self.work_time, minimum=0),
        }
        checked["backoff_cap"] = check_number("backoff_cap", self.backoff_cap,
                                              minimum=checked["backoff_base"])
        if not isinstance(self.faults, Faults):
            raise InvalidInput("faults", self.faults, "a deliverylab.engine.faults.Faults")
        if not isinstance(self.crash_exits, bool):
            raise InvalidInput("crash_exits", self.crash_exits, "True or False")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def replace(self, **changes: Any) -> WorkerSettings:
        """A copy with ``changes`` (validated as a new object is)."""
        check_names(changes)
        return dataclasses.replace(self, **changes)


FIELDS = tuple(f.name for f in dataclasses.fields(WorkerSettings))


def check_names(changes: dict[str, Any], expected: str = "a worker setting") -> None:
    """:class:`InvalidInput` for a name in ``changes`` that is not a setting, naming it and
    its value; ``expected`` says what it should have been."""
    for name, value in changes.items():
        if name not in FIELDS:
            raise InvalidInput(name, value, f"{expected} ({', '.join(FIELDS)})")
