"""Fault injection: named points, a rate for each, decided from one seed.

The lost ACK has two halves, as in the Two Generals problem. ``ack_fail`` loses the request:
the queue never hears it and the message comes back. ``ack_answer_lost`` loses the answer: the
queue deleted the message, but the worker hears nothing. The worker cannot tell them apart
(both are an ACK that timed out) and takes the same path after either; only the trace, written
by whoever injects the fault, says which half it was.

Whether a fault fires is a pure function of (seed, point, event id, delivery number), computed
with a keyed hash. That makes a run replay exactly, and it gives the *same fault schedule* to
every worker mode and every interleaving: delivery 2 of event ``evt-…`` loses its ACK in the
at-most-once run exactly when it does in the idempotent run, so the modes can be compared fairly.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from dataclasses import dataclass, field

from .errors import InvalidInput, check_int, check_number

FAULT_POINTS = (
    "ack_fail",             # the ACK request is lost on the way: the queue never hears it
    "ack_answer_lost",      # the ACK arrives and the message is deleted; the answer is lost
    "crash_after_receive",  # the worker dies holding the lease, before the effect
    "crash_after_commit",   # the effect committed, the worker dies before the ACK
    "process_error",        # the handler raises; retried with backoff through nack
    "lose_message",         # auto-ack style: the queue forgets the message, no effect happens
)


@dataclass(frozen=True)
class Faults:
    """Fault rates in [0, 1] per point, and the seed that decides each one."""

    seed: int = 0
    ack_fail: float = 0.0
    crash_after_receive: float = 0.0
    crash_after_commit: float = 0.0
    process_error: float = 0.0
    lose_message: float = 0.0
    ack_answer_lost: float = 0.0
    _key: bytes = field(init=False, repr=False, compare=False)
    _rates: dict[str, float] = field(init=False, repr=False, compare=False)
    active: bool = field(init=False, repr=False, compare=False)
    """True when any rate is above zero; the worker skips asking when nothing can fire."""

    def __post_init__(self) -> None:
        check_int("seed", self.seed)
        for point in FAULT_POINTS:
            check_number(f"{point} rate", getattr(self, point), minimum=0.0, maximum=1.0)
        object.__setattr__(self, "_key", str(self.seed).encode())
        object.__setattr__(self, "_rates", {p: float(getattr(self, p)) for p in FAULT_POINTS})
        object.__setattr__(self, "active", any(r > 0 for r in self._rates.values()))

    @classmethod
    def from_rates(cls, seed: int | None = None, **rates: float) -> Faults:
        """``Faults.from_rates(seed=7, ack_fail=0.8)``; unknown names are an error; no seed
        means a random one."""
        for name in rates:
            if name not in FAULT_POINTS:
                raise InvalidInput("fault point", name, f"one of {', '.join(FAULT_POINTS)}")
        if seed is None:
            seed = secrets.randbits(63)
        return cls(seed=seed, **rates)

    def rate(self, point: str) -> float:
        if point not in FAULT_POINTS:
            raise InvalidInput("fault point", point, f"one of {', '.join(FAULT_POINTS)}")
        rate: float = getattr(self, point)
        return rate

    def uniform(self, *key: object) -> float:
        """A number in [0, 1) fixed by the seed and ``key``."""
        digest = hashlib.blake2b("|".join(map(str, key)).encode(), key=self._key,
                                 digest_size=8).digest()
        number: int = struct.unpack(">Q", digest)[0]
        return number / 2**64

    def fires(self, point: str, event_id: str, delivery_count: int) -> bool:
        rate = self._rates.get(point)  # asked several times per message: keep it cheap
        if rate is None:
            rate = self.rate(point)  # raises, naming the unknown point
        if rate <= 0.0:
            return False
        return self.uniform(point, event_id, delivery_count) < rate

    def backoff(self, attempt: int, *, base: float, cap: float, event_id: str = "") -> float:
        """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt)).

        https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/
        """
        check_int("attempt", attempt, minimum=0)
        ceiling: float = min(cap, base * 2 ** min(attempt, 62))
        return round(self.uniform("backoff", event_id, attempt) * ceiling, 6)


NO_FAULTS = Faults()
