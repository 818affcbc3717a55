"""The demo's opening data: SKUs with prices and stock, customers with balances (cents).

Static data every service seeds its own database from on first start; at run time each
service reads only its own database. Some customers cannot pay and some SKUs run out, so the
load generator exercises every path of the saga.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sku:
    sku: str
    price_cents: int
    opening_stock: int


@dataclass(frozen=True)
class Customer:
    name: str
    opening_balance_cents: int


SKUS: tuple[Sku, ...] = (
    Sku("sku-apple", 120, 1_000_000),
    Sku("sku-bread", 350, 1_000_000),
    Sku("sku-cheese", 899, 500_000),
    Sku("sku-coffee", 1_250, 200_000),
    Sku("sku-truffle", 9_900, 40),        # scarce: runs out under load
    Sku("sku-saffron", 4_500, 10),        # scarcer still
)

CUSTOMERS: tuple[Customer, ...] = (
    *(Customer(f"cust-{i:02d}", 10_000_000) for i in range(1, 19)),
    Customer("cust-broke", 0),            # every charge is declined
    Customer("cust-thrifty", 5_000),      # pays a few small orders, then is declined
)

PRICES: dict[str, int] = {s.sku: s.price_cents for s in SKUS}


def amount_cents(items: list[tuple[str, int]]) -> int:
    """The price of ``(sku, quantity)`` items; raises KeyError for an unknown SKU."""
    return sum(PRICES[sku] * qty for sku, qty in items)
