"""A SQLite response cache: every answer is stored under a hash of everything that shaped it.

A run can then be replayed exactly (``replay-only`` mode turns a miss into :class:`CacheMiss`), and
several samples of one prompt stay distinct through their ``sample_index``. Several processes may
write the same file: WAL journaling, a busy timeout and ``INSERT OR IGNORE`` (the first answer
stored for a key wins) make that safe.

A cache can be exported to a gzipped JSON-lines file (:meth:`ResponseCache.export`: one row a line,
sorted by key, without keys or times), read back (:func:`read_export`) and loaded into another
(:meth:`ResponseCache.load`), which recomputes every key from its request: how ``make run`` ships the
base model's evaluation.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.llm.base import CacheMode

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    response TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created REAL NOT NULL
)
"""


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def cache_key(request: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``request`` (endpoint, model, messages, parameters, ...)."""
    return hashlib.sha256(_dumps(request).encode()).hexdigest()


_EXPORTED = ("kind", "model", "request", "response", "prompt_tokens", "completion_tokens")
"""The columns an export holds, in the order of the table (the key is recomputed, the time is not kept)."""


def read_export(path: str | Path) -> list[dict[str, Any]]:
    """The rows of an exported cache (:meth:`ResponseCache.export`); a file that is not one is a
    :class:`UserError`."""
    if not Path(path).is_file():
        raise UserError(f"exported response cache {path} does not exist")
    try:
        rows = [json.loads(line) for line in gzip.decompress(Path(path).read_bytes()).decode().splitlines()]
        fields = [{name: row[name] for name in _EXPORTED} for row in rows]
        if not all(isinstance(row["request"], dict) for row in fields):
            raise TypeError("a request is not a JSON object")
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not an exported response cache ({type(exc).__name__}: {exc})") from exc
    return fields


class ResponseCache:
    """Stored responses keyed by :func:`cache_key`. The async methods run SQLite off the event loop."""

    def __init__(self, path: str | Path, mode: CacheMode = "read-write", *, busy_timeout: float = 60.0):
        if mode not in ("read-write", "replay-only"):
            raise ValueError(f"a ResponseCache needs mode 'read-write' or 'replay-only', not {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the worker threads of asyncio.to_thread, serialised by a lock.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        self._setup(busy_timeout)

    def _setup(self, busy_timeout: float) -> None:
        # Two processes opening a fresh file at once: switching it to WAL can answer "database is
        # locked" at once, without waiting on the busy timeout (SQLite does not call its busy
        # handler there), so the setup is retried until the timeout.
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute(_SCHEMA)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def get_sync(self, key: str) -> dict[str, Any] | None:
        """The stored response for ``key``, or ``None``."""
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put_sync(
        self,
        key: str,
        *,
        kind: str,
        model: str,
        request: Mapping[str, Any],
        response: Mapping[str, Any],
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        """Store a response; a response already stored under ``key`` is kept."""
        row = {"kind": kind, "model": model, "request": request, "response": response}
        with self._lock:
            self._insert(key, row | {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens})

    def _insert(self, key: str, row: Mapping[str, Any]) -> None:
        """Store ``row`` (the exported fields) under ``key`` unless a response is stored there; the
        caller holds the lock."""
        values = [_dumps(row[name]) if name in ("request", "response") else row[name] for name in _EXPORTED]
        self._db.execute(
            "INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (key, *values, time.time())
        )

    async def get(self, key: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.get_sync, key)

    async def put(self, key: str, **fields: Any) -> None:
        await asyncio.to_thread(self.put_sync, key, **fields)

    def export(self, path: str | Path) -> int:
        """Write every stored response to ``path`` (gzipped JSON lines, sorted by key, so the same
        responses give the same bytes); returns how many."""
        columns = ", ".join(_EXPORTED)
        with self._lock:
            rows = self._db.execute(f"SELECT {columns} FROM responses ORDER BY key").fetchall()
        lines = []
        for row in rows:
            exported = dict(zip(_EXPORTED, row, strict=True))
            exported["request"], exported["response"] = json.loads(row[2]), json.loads(row[3])
            lines.append(_dumps(exported) + "\n")
        Path(path).write_bytes(gzip.compress("".join(lines).encode(), mtime=0))
        return len(rows)

    def load(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Store the rows of an exported cache (:func:`read_export`) under keys computed from their
        requests, keeping responses already stored; returns how many were new."""
        before = len(self)
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for row in rows:
                    self._insert(cache_key(row["request"]), row)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return len(self) - before

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
