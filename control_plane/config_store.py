"""Declarative config in the control plane: every revision of every object in the state store,
and the current set in memory.

* ``ConfigStore``: the objects' revisions in a ``control_plane.state.StateStore`` (SQLite's
  ``config_revisions`` table, or Consul's KV): every change of an object adds a revision:
  kind, name, revision (1, 2, ... per object, never reused), the canonical spec, ``applied_at``
  (unix seconds) and a ``deleted`` flag (a deletion's revision keeps the spec the object had).
  An object's latest revision is its state.
* ``ConfigState``: the current objects, loaded from the store at start (and again when
  another control-plane replica changed them: ``fetch`` then ``install``); applies and
  deletes are planned against them (all validation is ``mesh_common.config``'s), written to
  the store all or nothing, and only then swapped into memory. Callers serialize changes (the
  server holds one lock around plan, store and publish).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from control_plane.state import ConfigChange, Revision, StateStore
from mesh_common.config import (
    CONFIGURED,
    CREATED,
    DELETED,
    UNCHANGED,
    ApplyPlan,
    ConfigError,
    ConfigObject,
    Document,
    parse_object,
    plan_apply,
    to_doc,
)

__all__ = ["ConfigNotFound", "ConfigState", "ConfigStore", "Current", "Loaded", "Outcome",
           "Revision"]

log = logging.getLogger("mesh.control_plane.config")


class ConfigNotFound(LookupError):
    """No such object (or revision): ``str(err)`` is one line saying what is missing."""


class ConfigStore:
    """The revisions of config objects in a ``StateStore`` (the SQLite ``Store`` or
    ``ConsulStore``). Blocking I/O, thread-safe as the store is."""

    def __init__(self, store: StateStore) -> None:
        self._store = store

    def latest(self) -> list[Revision]:
        """The latest revision of every object ever stored (deletions included), by kind and
        name."""
        return self._store.config_latest()

    def get(self, kind: str, name: str, revision: int) -> Revision | None:
        """Revision ``revision`` of the object, or None."""
        return self._store.config_get(kind, name, revision)

    def revisions(self, kind: str, name: str) -> list[int]:
        """The revision numbers stored for the object, ascending."""
        return self._store.config_revisions(kind, name)

    def save(self, changes: Sequence[ConfigChange], applied_at: float) -> list[int]:
        """Store ``(kind, name, spec, deleted)`` changes as the next revision of each object,
        all or nothing; returns their revision numbers, in order."""
        return self._store.config_save(changes, applied_at)


@dataclass(frozen=True)
class Current:
    """A current object with its revision and when it was applied (unix seconds)."""

    obj: ConfigObject
    revision: int
    applied_at: float


@dataclass(frozen=True)
class Loaded:
    """What ``ConfigState.fetch`` read: the current objects, every object's last revision
    (deletions too) and the stored objects left out, one line each."""

    current: dict[tuple[str, str], Current]
    last: dict[tuple[str, str], int]
    problems: tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    """What a change did (or, in a dry run, would do) to one object."""

    kind: str
    name: str
    action: str
    revision: int


class ConfigState:
    """The current config objects (in memory, from the store) and the changes to them."""

    def __init__(self, store: ConfigStore) -> None:
        self._store = store
        self._current: dict[tuple[str, str], Current] = {}
        self._last_revision: dict[tuple[str, str], int] = {}
        self._objects: tuple[ConfigObject, ...] = ()

    def load(self) -> list[str]:
        """Read the current objects from the store and make them current (blocking I/O:
        ``fetch`` then ``install``). A stored object that no longer validates (a newer
        schema) is left out; returns those problems, one line each."""
        return self.install(self.fetch())

    def fetch(self) -> Loaded:
        """Read and validate the stored objects without changing anything in memory
        (blocking I/O: run it off the event loop)."""
        current: dict[tuple[str, str], Current] = {}
        last: dict[tuple[str, str], int] = {}
        problems: list[str] = []
        for rev in self._store.latest():
            last[(rev.kind, rev.name)] = rev.revision
            if rev.deleted:
                continue
            try:
                obj = parse_object(rev.doc(), f"stored revision {rev.revision}")
            except ConfigError as exc:
                problems.append(str(exc))
                continue
            current[obj.key] = Current(obj, rev.revision, rev.applied_at)
        return Loaded(current, last, tuple(problems))

    def install(self, loaded: Loaded) -> list[str]:
        """Make what ``fetch`` read current (no I/O: call it where readers run, on the event
        loop, holding the lock that serializes changes); returns its problems."""
        self._swap(dict(loaded.current), dict(loaded.last))
        return list(loaded.problems)

    def _swap(self, current: dict[tuple[str, str], Current],
              last: dict[tuple[str, str], int]) -> None:
        self._current, self._last_revision = current, last
        self._objects = tuple(current[k].obj for k in sorted(current))

    def objects(self) -> tuple[ConfigObject, ...]:
        """The current objects, by kind and name (an immutable tuple, safe to keep)."""
        return self._objects

    def current(self, kind: str | None = None) -> list[Current]:
        """The current objects (of ``kind``), by kind and name."""
        return [self._current[k] for k in sorted(self._current) if kind in (None, k[0])]

    def get(self, kind: str, name: str) -> Current | None:
        return self._current.get((kind, name))

    def plan(self, documents: Iterable[Document]) -> ApplyPlan:
        """Validate an apply against the current set (``mesh_common.config.plan_apply``);
        raises ``ConfigError``. Pure: stores nothing."""
        return plan_apply(self._objects, documents)

    def outcomes(self, plan: ApplyPlan) -> list[Outcome]:
        """What ``plan`` would do: per document, the action and the revision the object would
        have (an unchanged object keeps its own)."""
        out: list[Outcome] = []
        for c in plan.changes:
            if c.action == UNCHANGED:
                out.append(Outcome(c.obj.kind, c.obj.name, UNCHANGED,
                                   self._current[c.obj.key].revision))
            else:
                out.append(Outcome(c.obj.kind, c.obj.name, c.action,
                                   self._last_revision.get(c.obj.key, 0) + 1))
        return out

    def apply(self, plan: ApplyPlan, now: float) -> list[Outcome]:
        """Store the objects ``plan`` creates or configures (one transaction), then make them
        current. ``plan`` must come from ``plan`` with nothing changed since (callers hold a
        lock). Blocking I/O; raises the store's errors (then nothing changed)."""
        changed = [c for c in plan.changes if c.action in (CREATED, CONFIGURED)]
        revisions = self._store.save([(c.obj.kind, c.obj.name, to_doc(c.obj)["spec"], False)
                                      for c in changed], now)
        current, last = dict(self._current), dict(self._last_revision)
        by_key: dict[tuple[str, str], int] = {}
        for c, revision in zip(changed, revisions, strict=True):
            current[c.obj.key] = Current(c.obj, revision, now)
            last[c.obj.key] = by_key[c.obj.key] = revision
        self._swap(current, last)
        return [Outcome(c.obj.kind, c.obj.name, c.action,
                        by_key.get(c.obj.key, current[c.obj.key].revision))
                for c in plan.changes]

    def delete(self, kind: str, name: str, now: float) -> Outcome:
        """Delete the current object (stored as a new revision marked deleted). Raises
        ``ConfigNotFound`` when there is none. Blocking I/O."""
        held = self._current.get((kind, name))
        if held is None:
            raise ConfigNotFound(f"no {kind} named {name!r}")
        (revision,) = self._store.save([(kind, name, to_doc(held.obj)["spec"], True)], now)
        current, last = dict(self._current), dict(self._last_revision)
        del current[(kind, name)]
        last[(kind, name)] = revision
        self._swap(current, last)
        return Outcome(kind, name, DELETED, revision)

    def revision(self, kind: str, name: str, revision: int) -> Revision:
        """Revision ``revision`` of the object (deletions too). Raises ``ConfigNotFound``
        saying which revisions exist. Blocking I/O."""
        found = self._store.get(kind, name, revision)
        if found is not None:
            return found
        have = self._store.revisions(kind, name)
        if not have:
            raise ConfigNotFound(f"no {kind} named {name!r} was ever stored")
        span = f"{have[0]}" if len(have) == 1 else f"{have[0]}-{have[-1]}"
        raise ConfigNotFound(f"{kind} {name} has no revision {revision} (it has {span})")
