"""Sidecar state in SQLite (stdlib sqlite3, WAL): gangs, members, generation, acknowledgements.

Written before and after every process start and stop so that a sidecar killed with `kill -9` can adopt
what still runs and stop what leaked. Rows are soft-deleted (`deleted_at`) so history stays readable.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from pathlib import Path

import msgspec

from gateway.sidecar.providers.base import MemberHandle

SCHEMA = """
CREATE TABLE IF NOT EXISTS gangs (
    id TEXT PRIMARY KEY,
    service TEXT NOT NULL,
    incarnation INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    failures INTEGER NOT NULL DEFAULT 0,
    spec_hash TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    deleted_at REAL
);
CREATE TABLE IF NOT EXISTS members (
    id TEXT PRIMARY KEY,
    gang_id TEXT NOT NULL,
    incarnation INTEGER NOT NULL,
    role TEXT NOT NULL,
    rank INTEGER NOT NULL,
    serves INTEGER NOT NULL,
    handle BLOB NOT NULL,
    pid INTEGER,
    port INTEGER,
    started_at REAL NOT NULL,
    deleted_at REAL
);
CREATE INDEX IF NOT EXISTS members_gang ON members (gang_id, incarnation);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS acks (
    target TEXT PRIMARY KEY, generation INTEGER NOT NULL, updated_at REAL NOT NULL
);
"""


class GangRow(msgspec.Struct):
    id: str
    service: str
    incarnation: int
    state: str
    reason: str
    failures: int
    spec_hash: str
    created_at: float
    updated_at: float
    deleted_at: float | None = None


class MemberRow(msgspec.Struct):
    id: str
    gang_id: str
    incarnation: int
    role: str
    rank: int
    serves: bool
    handle: MemberHandle
    started_at: float
    deleted_at: float | None = None


class StateInUse(Exception):
    """Another sidecar holds this state directory; two would start every engine twice."""


class Store:
    """One SQLite file; every call is a short transaction (fast enough to run on the event loop).

    An exclusive lock on `PATH.lock` (released by the kernel when the process dies, `kill -9` included)
    keeps a second sidecar off the same state."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self._lock = open(self.path + ".lock", "a+")  # noqa: SIM115  (held for the store's life)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "?"
            self._lock.close()
            raise StateInUse(f"{self.path} is in use by another sidecar (pid {holder})") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()
        self._lock.close()

    # meta -------------------------------------------------------------------------------------------
    def get_meta(self, key: str, default: str = "") -> str:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else default

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    @property
    def generation(self) -> int:
        return int(self.get_meta("generation", "0"))

    @generation.setter
    def generation(self, value: int) -> None:
        self.set_meta("generation", str(value))

    def next_gang_id(self, service: str) -> str:
        key = f"seq:{service}"
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            seq = int(self.get_meta(key, "0"))
            self.set_meta(key, str(seq + 1))
        return f"{service}-{seq}"

    # gangs ------------------------------------------------------------------------------------------
    def save_gang(self, gang: GangRow) -> None:
        gang.updated_at = time.time()
        self.db.execute(
            "INSERT INTO gangs (id, service, incarnation, state, reason, failures, spec_hash, created_at,"
            " updated_at, deleted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET"
            " incarnation = excluded.incarnation, state = excluded.state, reason = excluded.reason,"
            " failures = excluded.failures, spec_hash = excluded.spec_hash, updated_at = excluded.updated_at,"
            " deleted_at = excluded.deleted_at",
            (
                gang.id,
                gang.service,
                gang.incarnation,
                gang.state,
                gang.reason,
                gang.failures,
                gang.spec_hash,
                gang.created_at,
                gang.updated_at,
                gang.deleted_at,
            ),
        )

    def gangs(self, include_deleted: bool = False) -> list[GangRow]:
        sql = "SELECT id, service, incarnation, state, reason, failures, spec_hash, created_at, updated_at, "
        sql += "deleted_at FROM gangs"
        if not include_deleted:
            sql += " WHERE deleted_at IS NULL"
        return [GangRow(*row) for row in self.db.execute(sql + " ORDER BY created_at, id")]

    # members ----------------------------------------------------------------------------------------
    def add_member(self, member: MemberRow) -> None:
        pid = member.handle.ref.get("pid")
        self.db.execute(
            "INSERT OR REPLACE INTO members (id, gang_id, incarnation, role, rank, serves, handle, pid, port,"
            " started_at, deleted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
            (
                member.id,
                member.gang_id,
                member.incarnation,
                member.role,
                member.rank,
                int(member.serves),
                msgspec.json.encode(member.handle),
                int(pid) if pid is not None else None,
                member.handle.port,
                member.started_at,
            ),
        )

    def members(self, gang_id: str | None = None, include_deleted: bool = False) -> list[MemberRow]:
        sql = (
            "SELECT id, gang_id, incarnation, role, rank, serves, handle, started_at, deleted_at FROM members"
        )
        clauses: list[str] = []
        params: list[object] = []
        if gang_id is not None:
            clauses.append("gang_id = ?")
            params.append(gang_id)
        if not include_deleted:
            clauses.append("deleted_at IS NULL")
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        rows = []
        for mid, gid, inc, role, rank, serves, handle, started, deleted in self.db.execute(
            sql + " ORDER BY started_at, id", params
        ):
            rows.append(
                MemberRow(
                    mid,
                    gid,
                    inc,
                    role,
                    rank,
                    bool(serves),
                    msgspec.json.decode(handle, type=MemberHandle),
                    started,
                    deleted,
                )
            )
        return rows

    def delete_members(self, member_ids: list[str]) -> None:
        now = time.time()
        self.db.executemany(
            "UPDATE members SET deleted_at = ? WHERE id = ? AND deleted_at IS NULL",
            [(now, mid) for mid in member_ids],
        )

    # acknowledgements -------------------------------------------------------------------------------
    def set_ack(self, target: str, generation: int) -> None:
        self.db.execute(
            "INSERT INTO acks (target, generation, updated_at) VALUES (?, ?, ?) ON CONFLICT(target) DO UPDATE"
            " SET generation = excluded.generation, updated_at = excluded.updated_at",
            (target, generation, time.time()),
        )

    def acks(self) -> dict[str, int]:
        return {target: gen for target, gen in self.db.execute("SELECT target, generation FROM acks")}
