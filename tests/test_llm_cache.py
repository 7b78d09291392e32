"""The SQLite response cache: keys, modes, and several processes writing one file."""

from __future__ import annotations

import asyncio
import gzip
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.llm import BackendSpec, CacheMiss
from pipeline.llm.cache import ResponseCache, cache_key, read_export
from pipeline.llm.layers import CachedBackend

REQUEST = {"kind": "complete", "endpoint": "e", "model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_key_covers_every_field_and_ignores_dict_order() -> None:
    base = cache_key(REQUEST | {"params": {"temperature": 0.0, "top_p": 1.0}, "sample_index": 0})
    same = cache_key({"sample_index": 0, "params": {"top_p": 1.0, "temperature": 0.0}} | REQUEST)
    assert base == same
    variants = [
        REQUEST | {"params": {"temperature": 0.7, "top_p": 1.0}, "sample_index": 0},
        REQUEST | {"params": {"temperature": 0.0, "top_p": 1.0}, "sample_index": 1},
        REQUEST | {"kind": "rate", "params": {"temperature": 0.0, "top_p": 1.0}, "sample_index": 0},
        REQUEST | {"endpoint": "f", "params": {"temperature": 0.0, "top_p": 1.0}, "sample_index": 0},
    ]
    assert len({base, *(cache_key(v) for v in variants)}) == 1 + len(variants)


def test_roundtrip_first_answer_wins(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "c.sqlite")
    fields = {
        "kind": "complete",
        "model": "m",
        "request": REQUEST,
        "prompt_tokens": 3,
        "completion_tokens": 4,
    }

    async def scenario() -> None:
        assert await cache.get("k") is None
        await cache.put("k", response={"text": "first"}, **fields)
        await cache.put("k", response={"text": "second"}, **fields)
        assert await cache.get("k") == {"text": "first"}

    asyncio.run(scenario())
    assert len(cache) == 1
    cache.close()
    row = sqlite3.connect(tmp_path / "c.sqlite").execute(
        "SELECT prompt_tokens, completion_tokens FROM responses"
    )
    assert row.fetchone() == (3, 4)


def test_export_and_load_recompute_keys_and_keep_stored_answers(tmp_path: Path) -> None:
    requests = [REQUEST | {"sample_index": i, "params": {"temperature": 0.7}} for i in range(3)]
    source = ResponseCache(tmp_path / "source.sqlite")
    for i, request in enumerate(requests):
        source.put_sync(
            cache_key(request),
            kind="complete",
            model="m",
            request=request,
            response={"text": f"answer {i}"},
            prompt_tokens=5,
            completion_tokens=i,
        )
    assert source.export(tmp_path / "a.jsonl.gz") == 3
    assert source.export(tmp_path / "b.jsonl.gz") == 3
    source.close()
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()

    target = ResponseCache(tmp_path / "target.sqlite")
    kept = cache_key(requests[0])
    target.put_sync(
        kept,
        kind="complete",
        model="m",
        request=requests[0],
        response={"text": "mine"},
        prompt_tokens=1,
        completion_tokens=1,
    )
    rows = read_export(tmp_path / "a.jsonl.gz")
    assert [row["request"] for row in rows] == sorted(requests, key=cache_key)
    assert target.load(rows) == 2  # the third key was stored already
    assert target.load(rows) == 0
    assert target.get_sync(kept) == {"text": "mine"}
    assert [target.get_sync(cache_key(r)) for r in requests[1:]] == [
        {"text": "answer 1"},
        {"text": "answer 2"},
    ]
    row = sqlite3.connect(tmp_path / "target.sqlite").execute(
        "SELECT prompt_tokens, completion_tokens FROM responses WHERE key = ?", (cache_key(requests[2]),)
    )
    assert row.fetchone() == (5, 2)
    target.close()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "does not exist"),
        (b"not gzip", "not an exported response cache"),
        (gzip.compress(b"{not json\n"), "not an exported response cache"),
        (gzip.compress(b'{"kind": "complete"}\n'), "KeyError"),
        (gzip.compress(b"[1, 2]\n"), "not an exported response cache"),
    ],
)
def test_read_export_refuses_what_is_not_an_export(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    path = tmp_path / "export.jsonl.gz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=expected):
        read_export(path)


def test_bad_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        ResponseCache(tmp_path / "c.sqlite", mode="off")


def test_replay_only_miss_raises_without_calling_the_model(tmp_path: Path) -> None:
    class NoModel:
        model_name = "m"
        identity = "nowhere"

        async def complete(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("replay-only must not call the model")

    cache = ResponseCache(tmp_path / "c.sqlite", mode="replay-only")
    backend = CachedBackend(NoModel(), cache, BackendSpec(kind="openai", model="m"))  # type: ignore[arg-type]
    with pytest.raises(CacheMiss, match="replay-only"):
        asyncio.run(backend.complete([{"role": "user", "content": "hi"}]))
    cache.close()


N = 1000
WRITER = textwrap.dedent(
    """
    import sys, time
    from pipeline.llm.cache import ResponseCache
    path, writer, start, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    cache = ResponseCache(path)
    time.sleep(max(0.0, go - time.time()))  # both writers start together
    for i in range(start, start + N):
        cache.put_sync(f"k{i}", kind="complete", model="m", request={"i": i},
                       response={"text": f"answer {i}", "writer": writer}, prompt_tokens=i, completion_tokens=1)
    cache.close()
    """
).replace("N", str(N))


def test_two_processes_writing_at_once_do_not_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    root = Path(__file__).resolve().parents[1]
    go = str(time.time() + 1.0)
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, str(start), go], cwd=root)
        for name, start in (("a", 0), ("b", N // 2))  # keys N/2 .. N-1 are written by both
    ]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    cache = ResponseCache(path)
    assert len(cache) == N + N // 2
    for i in range(N + N // 2):
        record = cache.get_sync(f"k{i}")
        assert record is not None and record["text"] == f"answer {i}"
        assert record["writer"] in ({"a"} if i < N // 2 else {"b"} if i >= N else {"a", "b"})
    cache.close()
