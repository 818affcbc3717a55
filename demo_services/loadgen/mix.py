"""What the load generator sends: a pure, seeded choice of orders.

Most customers can pay; some are ``cust-broke`` (always declined) or ``cust-thrifty`` (a few
small orders, then declined); some orders include the scarce SKUs (which run out); a share
of sends repeat an earlier request id with the same body (idempotency), and calls that failed
without an answer are sent again with their request id until they get one.
"""

from __future__ import annotations

import random
import uuid
from collections import deque
from dataclasses import dataclass

from demo_services.common.catalog import CUSTOMERS, SKUS

SCARCE = ("sku-truffle", "sku-saffron")
PLENTY = tuple(s.sku for s in SKUS if s.sku not in SCARCE)
PAYING = tuple(c.name for c in CUSTOMERS if c.name not in ("cust-broke", "cust-thrifty"))


@dataclass(frozen=True)
class MixWeights:
    """Shares (0..1) of each kind of send."""

    broke: float = 0.07          # customer cust-broke: declined
    thrifty: float = 0.08        # customer cust-thrifty: declined once her balance is spent
    scarce: float = 0.12         # an order that includes a scarce SKU
    resend: float = 0.08         # re-send an earlier request (same id, same body)
    twin: float = 0.03           # send a new request twice at once


@dataclass(frozen=True)
class Planned:
    """One CreateOrder to send."""

    request_id: str
    customer: str
    items: tuple[tuple[str, int], ...]
    resend: bool = False         # this request id was sent before


class Mix:
    """Chooses the next sends from a seeded RNG (deterministic for a seed)."""

    def __init__(self, rng: random.Random | None = None, weights: MixWeights = MixWeights(),
                 run_id: str | None = None, recent: int = 256) -> None:
        self.rng = rng or random.Random()
        self.w = weights
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.seq = 0
        self.recent: deque[Planned] = deque(maxlen=recent)
        self.retry: deque[Planned] = deque()

    def new_order(self) -> Planned:
        r = self.rng
        self.seq += 1
        roll = r.random()
        customer = ("cust-broke" if roll < self.w.broke else
                    "cust-thrifty" if roll < self.w.broke + self.w.thrifty else
                    r.choice(PAYING))
        skus = r.sample(PLENTY, r.randint(1, 3))
        items = [(sku, r.randint(1, 3)) for sku in skus]
        if r.random() < self.w.scarce:
            items.append((r.choice(SCARCE), r.randint(1, 2)))
        planned = Planned(f"lg-{self.run_id}-{self.seq}", customer, tuple(items))
        self.recent.append(planned)
        return planned

    def again(self, planned: Planned) -> None:
        """Send ``planned`` again later (it failed without an answer)."""
        self.retry.append(planned)

    def next(self) -> list[Planned]:
        """The sends of the next tick: one, or two with the same request id (a twin)."""
        if self.retry:
            p = self.retry.popleft()
            return [Planned(p.request_id, p.customer, p.items, resend=True)]
        roll = self.rng.random()
        if roll < self.w.resend and self.recent:
            p = self.rng.choice(self.recent)
            return [Planned(p.request_id, p.customer, p.items, resend=True)]
        planned = self.new_order()
        if roll < self.w.resend + self.w.twin:
            return [planned, Planned(planned.request_id, planned.customer, planned.items,
                                     resend=True)]
        return [planned]
