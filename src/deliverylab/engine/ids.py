"""Identifiers: random in production, reproducible under a seed.

With a seed, every id comes from one ``random.Random(seed)``, so the same scenario writes the
same ids on every run and a chapter's tables compare byte for byte. Without one, ids are 48 bits
from the operating system's random source (``os.urandom``, what ``uuid4`` uses).
"""

from __future__ import annotations

import os
import random


class Ids:
    def __init__(self, seed: int | None = None) -> None:
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        self.seed = seed
        self._rng = random.Random(seed) if seed is not None else None

    def new(self, prefix: str) -> str:
        """A fresh id such as ``evt-3f2a9c01d4e7``."""
        if self._rng is None:
            return f"{prefix}-{os.urandom(6).hex()}"
        return f"{prefix}-{self._rng.getrandbits(48):012x}"

    def order_id(self) -> str:
        return self.new("o")

    def event_id(self) -> str:
        return self.new("evt")

    def message_id(self) -> str:
        return self.new("msg")

    def receipt(self) -> str:
        return self.new("rcpt")
