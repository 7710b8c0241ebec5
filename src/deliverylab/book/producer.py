"""A client that posts orders to the HTTP API, and retries, over a link that loses both halves.

The producer meets the lost ACK's two halves too. A request can be lost on its way (the server
never hears it and writes nothing), or the server writes the order and its answer is lost on
the way back. The client sees the same timeout after either and cannot tell them apart, so it
must send again, and only what it sends decides whether a retry that reaches the server is a
second order or a replay of the first: a body without an ``orderId`` is a new order every
time; the same ``orderId``, or the same ``Idempotency-Key`` header, is recognised and answered
with the first result.

:class:`LossyLink` stands between a client and the API: the client is FastAPI's
``TestClient`` on the real application (in process, as chapter 4 calls it) or an
``httpx.Client`` on a running ``deliverylab api``. Whether attempt *n* of request *r* loses its
request or its answer is a keyed hash of (seed, half, *r*, *n*), like every fault in the
engine, so a run replays exactly.
"""

from __future__ import annotations

import random
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..engine import store
from ..engine.errors import InvalidInput, check_int, check_number, check_text
from ..engine.faults import Faults
from .lab import ITEMS

if TYPE_CHECKING:
    import pandas as pd

REQUEST_LOST = "request_lost"  # the request never reaches the server: nothing is written
ANSWER_LOST = "answer_lost"    # the server wrote the order; its answer never comes back
# What a retry carries to say "the same order": nothing, the order's own id, or a key header.
IDENTITIES = ("none", "orderId", "Idempotency-Key")
MAX_ATTEMPTS = 50


class NoAnswer(TimeoutError):
    """No answer came back: the request was lost, or its answer was. The client cannot know
    which (``LossyLink.log`` can: it is the network's record, not the client's view)."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt as the network saw it: ``outcome`` is ``request lost``, ``answer lost`` or
    ``answered`` (with the status the server gave, also when its answer was lost)."""

    request_id: str
    attempt: int
    outcome: str
    status: int | None


class LossyLink:
    """The network between a client and the API: ``post`` loses requests and answers at the
    given rates, decided from the seed; ``log`` records what happened to every attempt."""

    def __init__(self, client: Any, *, seed: int = 0, lost_request: float = 0.0,
                 lost_answer: float = 0.0) -> None:
        if not callable(getattr(client, "post", None)):
            raise InvalidInput("client", client, "an HTTP client with post() (TestClient,"
                                                 " httpx.Client)")
        self.client = client
        self.faults = Faults(seed=check_int("seed", seed))
        self.lost_request = check_number("lost_request", lost_request, minimum=0, maximum=1)
        self.lost_answer = check_number("lost_answer", lost_answer, minimum=0, maximum=1)
        self.log: list[Attempt] = []

    def _lost(self, half: str, rate: float, request_id: str, attempt: int) -> bool:
        return rate > 0 and self.faults.uniform(half, request_id, attempt) < rate

    def post(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None, *,
             request_id: str, attempt: int) -> Any:
        """POST ``body`` to ``path``; the response, or :class:`NoAnswer` for either half."""
        check_text("request_id", request_id)
        check_int("attempt", attempt, minimum=1)
        if self._lost(REQUEST_LOST, self.lost_request, request_id, attempt):
            self.log.append(Attempt(request_id, attempt, "request lost", None))
            raise NoAnswer("no answer from the API")
        response = self.client.post(path, json=body, headers=headers or {})
        if self._lost(ANSWER_LOST, self.lost_answer, request_id, attempt):
            self.log.append(Attempt(request_id, attempt, "answer lost", response.status_code))
            raise NoAnswer("no answer from the API")  # the same words: the halves look alike
        self.log.append(Attempt(request_id, attempt, "answered", response.status_code))
        return response


def order_request(request_id: str, item_id: str, qty: int, identity: str
                  ) -> tuple[dict[str, Any], dict[str, str]]:
    """The body and headers of one order, identified on a retry by ``identity``: ``none`` (the
    server makes an order id each time), ``orderId`` (the request's id as the order's) or
    ``Idempotency-Key`` (the request's id as the header)."""
    if identity not in IDENTITIES:
        raise InvalidInput("identity", identity, " or ".join(map(repr, IDENTITIES)))
    body: dict[str, Any] = {"itemId": item_id, "qty": qty}
    if identity == "orderId":
        body = {"orderId": request_id, **body}
    headers = {"Idempotency-Key": request_id} if identity == "Idempotency-Key" else {}
    return body, headers


def post_with_retries(link: LossyLink, request_id: str, item_id: str, qty: int, *,
                      identity: str, max_attempts: int = MAX_ATTEMPTS) -> tuple[Any, int]:
    """Post one order and send the same request again after every timeout, until an answer
    comes back. Returns (the response, the attempts it took); raises :class:`NoAnswer` after
    ``max_attempts``."""
    if not isinstance(link, LossyLink):
        raise InvalidInput("link", link, "a LossyLink")
    check_int("max_attempts", max_attempts, minimum=1, maximum=10_000)
    body, headers = order_request(request_id, item_id, qty, identity)
    for attempt in range(1, max_attempts + 1):
        try:
            return link.post("/orders", body, headers, request_id=request_id,
                             attempt=attempt), attempt
        except NoAnswer:
            continue  # lost on the way or on the way back: the client cannot know, so again
    raise NoAnswer(f"no answer for {request_id!r} after {max_attempts} attempts")


@dataclass(frozen=True, slots=True)
class ProducerRun:
    """What one client's retries did: requests sent, attempts made, attempts the server
    answered (lost answers included) and orders the database holds afterwards."""

    identity: str
    requests: int
    attempts: int
    reached_server: int
    orders_written: int

    @property
    def extra_orders(self) -> int:
        """Orders beyond one per request: each a customer's duplicate purchase."""
        return self.orders_written - self.requests


def producer_run(*, identity: str, seeds: Sequence[int], requests: int = 20,
                 lost_request: float = 0.0, lost_answer: float = 0.0) -> ProducerRun:
    """``requests`` orders per seed posted by :func:`post_with_retries` through a
    :class:`LossyLink` to the real API on a fresh SQLite file (one file for all the seeds,
    each seed's request ids its own), then the orders counted in the database."""
    with warnings.catch_warnings():  # Starlette's notice about a future HTTP client; not ours
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    from ..app.api import create_app

    seeds = [check_int("seed", s) for s in seeds]
    if not seeds:
        raise InvalidInput("seeds", seeds, "at least one seed")
    check_int("requests", requests, minimum=0, maximum=10_000)
    attempts = reached = 0
    with tempfile.TemporaryDirectory() as scratch:
        db = Path(scratch) / "api.db"
        store.init_db(db).close()
        with TestClient(create_app(db)) as client:
            for seed in seeds:
                link = LossyLink(client, seed=seed, lost_request=lost_request,
                                 lost_answer=lost_answer)
                rng = random.Random(seed)
                for i in range(requests):
                    item, qty = rng.choice(ITEMS), rng.randint(1, 3)
                    response, n = post_with_retries(link, f"r-{seed}-{i:03d}", item, qty,
                                                    identity=identity)
                    if response.status_code not in (200, 201):
                        raise RuntimeError(f"the API answered {response.status_code}:"
                                           f" {response.text}")
                    attempts += n
                reached += sum(a.outcome != "request lost" for a in link.log)
        conn = store.connect(db)
        try:
            written = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
        finally:
            conn.close()
    return ProducerRun(identity=identity, requests=requests * len(seeds), attempts=attempts,
                       reached_server=reached, orders_written=written)


def producer_table(*, seeds: Sequence[int], requests: int = 20, lost_request: float = 0.3,
                   lost_answer: float = 0.3) -> pd.DataFrame:
    """For each half of a lost exchange (lost requests, lost answers) and each way of naming a
    retry (:data:`IDENTITIES`): requests, attempts, attempts that reached the server, orders
    written and extra orders, summed over ``seeds``."""
    import pandas as pd

    rows = []
    for fault, rates in (("lost requests", {"lost_request": lost_request}),
                         ("lost answers", {"lost_answer": lost_answer})):
        for identity in IDENTITIES:
            run = producer_run(identity=identity, seeds=seeds, requests=requests, **rates)
            rows.append({"fault": fault, "retry carries": identity, "requests": run.requests,
                         "attempts": run.attempts, "reached the server": run.reached_server,
                         "orders written": run.orders_written,
                         "extra orders": run.extra_orders})
    return pd.DataFrame(rows)
