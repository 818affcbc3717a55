"""The embedded registry: instances in memory, written behind to SQLite (``Store``) so they
survive a restart of the control plane.

Mutations change memory at once and mark the instance dirty; one background task (``start``)
writes the dirty instances' latest state in one transaction each round, in a worker thread,
so the event loop never waits on the disk and writes can never land out of order. ``close``
flushes what is left. A crash loses at most the last few milliseconds of changes, which the
sidecars' re-registration after the restart restores.

After a restart (``load``) every stored instance counts as disconnected *from the restart*:
the grace period runs from then, so an outage of the control plane never empties the registry
and every sidecar has ``grace_period_s`` to come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import replace

from control_plane.registry import (
    HEALTH_VALUES,
    Instance,
    Key,
    Registry,
    expired,
    normalize_health,
)
from control_plane.store import InstanceRow, Store

log = logging.getLogger("mesh.control_plane.registry")

RETRY_AFTER_ERROR_S = 1.0


def _row(inst: Instance) -> InstanceRow:
    return InstanceRow(inst.service, inst.instance_id, inst.spiffe_id, inst.inbound,
                       inst.outbound, inst.admin, inst.labels, inst.health, inst.registered_at)


class EmbeddedRegistry(Registry):
    """In memory; persisted through ``store`` when one is given (None = memory only)."""

    def __init__(self, grace_period_s: float, store: Store | None = None,
                 instances: Iterable[Instance] = ()) -> None:
        super().__init__(grace_period_s)
        self._store = store
        self._by_key: dict[Key, Instance] = {i.key: i for i in instances}
        self._dirty: set[Key] = set()
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def load(cls, store: Store, grace_period_s: float, now: float) -> EmbeddedRegistry:
        """The registry as ``store`` left it, every instance disconnected at ``now`` (the
        restart). Blocking I/O: call it at start-up, before serving."""
        loaded = [Instance(r.service, r.instance_id, r.spiffe_id, r.inbound, r.outbound, r.admin,
                           r.labels, normalize_health(r.health),
                           connected=False, disconnected_at=now, registered_at=r.registered_at)
                  for r in store.list_instances()]
        return cls(grace_period_s, store, loaded)

    # ------------------------------------------------------------------ the model
    def register(self, instance: Instance, now: float) -> Instance:
        if instance.health not in HEALTH_VALUES:
            raise ValueError(f"health must be one of {sorted(HEALTH_VALUES)}, got "
                             f"{instance.health!r}")
        stored = replace(instance, connected=True, disconnected_at=None, registered_at=now)
        self._by_key[stored.key] = stored
        self._changed(stored.key)
        return stored

    def set_health(self, service: str, instance_id: str, health: str, now: float) -> bool:
        if health not in HEALTH_VALUES:
            raise ValueError(f"health must be one of {sorted(HEALTH_VALUES)}, got {health!r}")
        inst = self._by_key.get((service, instance_id))
        if inst is None or inst.health == health:
            return False
        self._by_key[inst.key] = replace(inst, health=health)
        self._changed(inst.key)
        return True

    def disconnected(self, service: str, instance_id: str, now: float) -> bool:
        inst = self._by_key.get((service, instance_id))
        if inst is None or not inst.connected:
            return False
        self._by_key[inst.key] = replace(inst, connected=False, disconnected_at=now)
        self._notify()  # connection state is not persisted: nothing to write
        return True

    def prune(self, now: float) -> list[Instance]:
        gone = [i for i in self._by_key.values() if expired(i, now, self.grace_period_s)]
        for inst in gone:
            del self._by_key[inst.key]
            self._dirty.add(inst.key)
        if gone:
            self._wake.set()
            self._notify()
        return sorted(gone, key=lambda i: i.key)

    def instances(self) -> list[Instance]:
        return [self._by_key[k] for k in sorted(self._by_key)]

    def get(self, service: str, instance_id: str) -> Instance | None:
        return self._by_key.get((service, instance_id))

    def _changed(self, key: Key) -> None:
        self._dirty.add(key)
        self._wake.set()
        self._notify()

    # ------------------------------------------------------------------ persistence
    async def start(self) -> None:
        if self._store is not None and self._task is None:
            self._task = asyncio.create_task(self._flush_loop(), name="registry-flush")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self.flush()
        except Exception as exc:  # the process is stopping: say so, do not mask the stop
            log.error("could not save the registry on close: %s", exc)

    async def flush(self) -> None:
        """Write every dirty instance's current state (or its deletion) now. Raises the
        store's error; the instances stay dirty then."""
        if self._store is None:
            self._dirty.clear()
            return
        async with self._flush_lock:
            while self._dirty:
                keys, self._dirty = self._dirty, set()
                upserts = [_row(self._by_key[k]) for k in keys if k in self._by_key]
                deletes = [k for k in keys if k not in self._by_key]
                try:
                    await asyncio.to_thread(self._store.save_instances, upserts, deletes)
                except BaseException:
                    self._dirty |= keys
                    raise

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:
                log.error("could not save the registry (will retry): %s", exc)
                await asyncio.sleep(RETRY_AFTER_ERROR_S)
                self._wake.set()
