"""The service registry: which instances exist, where they listen, and how healthy they are.

``Registry`` is the interface, with two backends (``mesh-control-plane --registry``):
``control_plane.registry.embedded`` keeps instances in memory with a SQLite write-behind (the
default); ``control_plane.registry.consul`` keeps them in memory too and registers them as
Consul agent services with a TTL check, watching the catalog for the instances of the other
control-plane replicas. Both pass one contract suite (tests/integration/
test_registry_contract.py).

The model, as every backend must keep it:

* An instance is keyed by ``(service, instance_id)``. ``service`` always comes from the
  sidecar's certificate, never from what it says.
* ``register`` makes it connected (again); ``disconnected`` starts its grace period;
  ``prune(now)`` removes the instances disconnected for longer than ``grace_period_s``. A
  disconnected instance stays in every snapshot until it is pruned, with its last health.
* Every change is told to the subscribers (``subscribe``), synchronously, after the change,
  on the event loop's thread (a backend that learns of changes elsewhere, like Consul's
  watch, tells them there too); a subscriber must not call back into the registry's mutators.
* A backend shared by several control planes (Consul) holds instances this one did not
  register: they come and go with the catalog, and ``set_health``/``disconnected`` on them
  are False (the replica holding the instance's stream reports those).

This module is pure: values and the interface, no I/O.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

SERVING = "SERVING"
NOT_SERVING = "NOT_SERVING"
UNREACHABLE = "UNREACHABLE"
UNKNOWN = "UNKNOWN"
SERVICE_UNKNOWN = "SERVICE_UNKNOWN"  # grpc.health.v1: the app does not know the service
NO_APP = ""
HEALTH_VALUES = frozenset({SERVING, NOT_SERVING, UNREACHABLE, UNKNOWN, SERVICE_UNKNOWN, NO_APP})

Key = tuple[str, str]
"""``(service, instance_id)``."""

Listener = Callable[[], None]


@dataclass(frozen=True)
class Instance:
    """One registered sidecar (and its app).

    Addresses are ``HOST:PORT`` strings; ``inbound`` is "" for an outbound-only sidecar, and
    ``outbound``/``admin`` "" when it has none. ``labels`` are sorted ``(key, value)`` pairs.
    ``health`` is the app's (``HEALTH_VALUES``; "" = no app). Times are unix seconds:
    ``disconnected_at`` is None while connected.
    """

    service: str
    instance_id: str
    spiffe_id: str
    inbound: str = ""
    outbound: str = ""
    admin: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    health: str = NO_APP
    connected: bool = True
    disconnected_at: float | None = None
    registered_at: float = 0.0

    @property
    def key(self) -> Key:
        return (self.service, self.instance_id)

    @property
    def serving(self) -> bool:
        """True when its app reports SERVING: only then is it a healthy endpoint."""
        return self.health == SERVING


def normalize_health(value: str) -> str:
    """``value`` when it is one of ``HEALTH_VALUES``, else UNKNOWN (a newer sidecar may know
    more states; none of them is SERVING)."""
    return value if value in HEALTH_VALUES else UNKNOWN


def sort_labels(labels: Iterable[tuple[str, str]] | dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Labels as the sorted tuple of pairs ``Instance.labels`` holds."""
    items = labels.items() if isinstance(labels, dict) else labels
    return tuple(sorted((str(k), str(v)) for k, v in items))


def expired(instance: Instance, now: float, grace_period_s: float) -> bool:
    """True when ``instance`` has been disconnected for longer than ``grace_period_s``."""
    return (not instance.connected and instance.disconnected_at is not None
            and now - instance.disconnected_at > grace_period_s)


class Registry(ABC):
    """Instances and their health. Methods are synchronous and never block on I/O (a backend
    that persists or talks to a catalog does so in the background, between ``start`` and
    ``close``); ``now`` is unix seconds from the caller's clock."""

    def __init__(self, grace_period_s: float) -> None:
        if grace_period_s < 0:
            raise ValueError("grace_period_s must be >= 0")
        self.grace_period_s = grace_period_s
        self._listeners: list[Listener] = []

    # ------------------------------------------------------------------ change notification
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener()`` after every change; returns a function that unsubscribes."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)
        return unsubscribe

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Start background work (persistence, catalog sync). Idempotent."""

    async def close(self) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Stop background work and flush what is pending. Idempotent."""

    # ------------------------------------------------------------------ the model
    @abstractmethod
    def register(self, instance: Instance, now: float) -> Instance:
        """Add or replace the instance under ``instance.key``, connected, ``registered_at =
        now``; returns the stored value. Notifies."""

    @abstractmethod
    def set_health(self, service: str, instance_id: str, health: str, now: float) -> bool:
        """Set an instance's app health; True (and a notification) when it changed. An
        unknown instance or an unchanged health is False. Raises ValueError for a health not
        in ``HEALTH_VALUES``."""

    @abstractmethod
    def disconnected(self, service: str, instance_id: str, now: float) -> bool:
        """Its stream is gone: not connected, ``disconnected_at = now`` (the grace period
        starts). False when unknown or already disconnected. Notifies when True."""

    @abstractmethod
    def prune(self, now: float) -> list[Instance]:
        """Remove and return the instances disconnected for longer than the grace period
        (``expired``). Notifies when any was removed."""

    @abstractmethod
    def instances(self) -> list[Instance]:
        """Every instance, sorted by ``(service, instance_id)``."""

    @abstractmethod
    def get(self, service: str, instance_id: str) -> Instance | None:
        """The instance under that key, or None."""
