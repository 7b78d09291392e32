"""A SQLite response cache: every answer is stored under a hash of everything that shaped it.

A run can then be replayed exactly (``replay-only`` mode turns a miss into :class:`CacheMiss`), and
several samples of one prompt stay distinct through their ``sample_index``. Several processes may
write the same file: WAL journaling, a busy timeout and ``INSERT OR IGNORE`` (the first answer
stored for a key wins) make that safe.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    kind,
                    model,
                    _dumps(request),
                    _dumps(response),
                    prompt_tokens,
                    completion_tokens,
                    time.time(),
                ),
            )

    async def get(self, key: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.get_sync, key)

    async def put(self, key: str, **fields: Any) -> None:
        await asyncio.to_thread(self.put_sync, key, **fields)

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
