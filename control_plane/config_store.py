"""Declarative config in the control plane: every revision of every object in SQLite, and the
current set in memory.

* ``ConfigStore``: the ``config_revisions`` table in the control plane's SQLite file. Every
  change of an object adds a row: kind, name, revision (1, 2, ... per object, never reused),
  the canonical spec as JSON, ``applied_at`` (unix seconds) and a ``deleted`` flag (a
  deletion's row keeps the spec the object had). An object's latest row is its state.
* ``ConfigState``: the current objects, loaded from the store at start; applies and deletes
  are planned against them (all validation is ``mesh_common.config``'s), written to the store
  in one transaction, and only then swapped into memory. Callers serialize changes (the
  server holds one lock around plan, store and publish).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from control_plane.store import Store
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

log = logging.getLogger("mesh.control_plane.config")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS config_revisions (
    kind       TEXT NOT NULL,
    name       TEXT NOT NULL,
    revision   INTEGER NOT NULL,   -- 1, 2, ... per object
    spec       TEXT NOT NULL,      -- JSON of the canonical spec (mesh_common.config.to_doc)
    applied_at REAL NOT NULL,      -- unix seconds
    deleted    INTEGER NOT NULL,   -- 1: this revision deleted the object (spec: as it was)
    PRIMARY KEY (kind, name, revision)
)
"""
_COLUMNS = "kind, name, revision, spec, applied_at, deleted"


class ConfigNotFound(LookupError):
    """No such object (or revision): ``str(err)`` is one line saying what is missing."""


@dataclass(frozen=True)
class Revision:
    """One stored revision of an object: its canonical spec (a JSON-able mapping),
    ``applied_at`` in unix seconds and whether it is a deletion."""

    kind: str
    name: str
    revision: int
    spec: dict[str, Any]
    applied_at: float
    deleted: bool

    def doc(self) -> dict[str, Any]:
        """The document ``{kind, name, spec}`` (what ``apply`` takes back)."""
        return {"kind": self.kind, "name": self.name, "spec": self.spec}


def _row(r: tuple[Any, ...]) -> Revision:
    try:
        spec = json.loads(r[3])
    except ValueError:
        spec = {}
    return Revision(r[0], r[1], int(r[2]), spec if isinstance(spec, dict) else {}, float(r[4]),
                    bool(r[5]))


class ConfigStore:
    """The revisions of config objects, in the control plane's SQLite file (``Store``)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        with store.transaction() as db:
            db.execute(_SCHEMA)

    def latest(self) -> list[Revision]:
        """The latest revision of every object ever stored (deletions included), by kind and
        name."""
        with self._store.transaction() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM config_revisions AS r WHERE revision = ("
                " SELECT MAX(revision) FROM config_revisions"
                " WHERE kind = r.kind AND name = r.name) ORDER BY kind, name").fetchall()
        return [_row(r) for r in rows]

    def get(self, kind: str, name: str, revision: int) -> Revision | None:
        """Revision ``revision`` of the object, or None."""
        with self._store.transaction() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM config_revisions"
                             " WHERE kind = ? AND name = ? AND revision = ?",
                             (kind, name, revision)).fetchone()
        return _row(row) if row else None

    def revisions(self, kind: str, name: str) -> list[int]:
        """The revision numbers stored for the object, ascending."""
        with self._store.transaction() as db:
            rows = db.execute("SELECT revision FROM config_revisions WHERE kind = ? AND name = ?"
                              " ORDER BY revision", (kind, name)).fetchall()
        return [int(r[0]) for r in rows]

    def save(self, changes: Sequence[tuple[str, str, dict[str, Any], bool]],
             applied_at: float) -> list[int]:
        """Store ``(kind, name, spec, deleted)`` changes as the next revision of each object,
        all in one transaction (all or nothing); returns their revision numbers, in order."""
        out: list[int] = []
        with self._store.transaction() as db:
            for kind, name, spec, deleted in changes:
                (last,) = db.execute("SELECT COALESCE(MAX(revision), 0) FROM config_revisions"
                                     " WHERE kind = ? AND name = ?", (kind, name)).fetchone()
                revision = int(last) + 1
                db.execute(f"INSERT INTO config_revisions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                           (kind, name, revision, json.dumps(spec, separators=(",", ":")),
                            applied_at, int(deleted)))
                out.append(revision)
        return out


@dataclass(frozen=True)
class Current:
    """A current object with its revision and when it was applied (unix seconds)."""

    obj: ConfigObject
    revision: int
    applied_at: float


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
        """Read the current objects from the store (blocking I/O). A stored object that no
        longer validates (a newer schema) is left out; returns those problems, one line
        each."""
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
        self._swap(current, last)
        return problems

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
