"""A loopback OpenAI-compatible chat server for tests and benchmarks, with faults on demand.

    with FakeOpenAIServer(delay=0.2) as server:
        spec = BackendSpec(kind="openai", model="fake", base_urls=[server.base_url])

It runs uvicorn in a background thread on 127.0.0.1 (a free port), answers
``POST /v1/chat/completions`` after ``delay`` seconds without serialising concurrent requests,
reports usage, and returns ``logprobs`` when a request asks for them: each digit token of the
reply carries a spread over its neighbouring digits, so a rating read from log-probabilities has
a non-integer expected value. ``fault`` makes every request misbehave in one way:

- ``"500"``: HTTP 500; ``"429"``: HTTP 429 with ``Retry-After: 0.1``;
- ``"hang"``: never answers (until the server stops), to exercise client timeouts;
- ``"empty"``: HTTP 200 with an empty body; ``"non-json"``: HTTP 200 with a body that is not JSON;
- ``"nonsense"``: a well-formed answer whose text holds no rating.

``schedule`` (a :class:`FaultSchedule`) gives a reproducible share of requests a fault instead,
chosen by each request's arrival number, plus an optional burst of consecutive failures.
``api_key`` makes it refuse (401) any other bearer token; ``models`` makes it serve only those
models (404 ``model_not_found`` otherwise), listed by ``GET /v1/models``. ``kill_sender_at=N``
sends SIGKILL to the process that sent the N-th chat request (found from the connection's port),
a deterministic way to crash a worker mid-run. Faults, refusals and kills apply to chat requests;
the model list only checks the key.

:func:`llama_cpp_server` instead starts a real llama.cpp server (``llama-cpp-python[server]``, not a
dependency of the project: :func:`llama_cpp_missing` says when it is absent) with the embedded GGUF.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.embedded import embedded_gguf_path
from pipeline.launch import stop_process

FAULTS = ("500", "429", "hang", "empty", "non-json", "nonsense")
DEFAULT_REPLY = "Rating: 5\nReason: This is a fixed reply from the fake server."
NONSENSE_REPLY = "Bananas are yellow and the sky is wide."
_TOKEN = re.compile(r"\s*\d|\s*[^\s\d]+|\s+")


@dataclass(frozen=True)
class FaultSchedule:
    """Which chat requests misbehave, by arrival number (0 for the first), the same in every run.

    ``rate``: the share of requests given a fault, each drawn from ``kinds`` by a generator seeded
    with ``(seed, number)``; ``burst=(first, count)``: requests ``first .. first + count - 1``
    all get ``burst_fault`` (an outage).
    """

    rate: float = 0.0
    kinds: tuple[str, ...] = FAULTS
    seed: int = 0
    burst: tuple[int, int] | None = None
    burst_fault: str = "500"

    def __post_init__(self) -> None:
        unknown = sorted({*self.kinds, self.burst_fault} - set(FAULTS))
        if unknown or not 0 <= self.rate <= 1:
            raise ValueError(f"bad fault schedule: rate {self.rate}, unknown kinds {unknown}")

    def fault(self, number: int) -> str | None:
        if self.burst is not None and self.burst[0] <= number < self.burst[0] + self.burst[1]:
            return self.burst_fault
        draw = random.Random(f"{self.seed}:{number}")
        return draw.choice(self.kinds) if draw.random() < self.rate else None


def sender_pid(client_port: int, server_port: int) -> int | None:
    """The process holding the client end of a loopback TCP connection (``None`` if it is gone)."""
    import psutil

    for connection in psutil.net_connections(kind="tcp"):
        local, remote = connection.laddr, connection.raddr
        if local and remote and local.port == client_port and remote.port == server_port:
            return connection.pid
    return None


def _tokens(text: str) -> list[str]:
    """Split text the way a BPE tokenizer roughly would: words with their leading space, single digits."""
    return _TOKEN.findall(text)


def _logprobs(tokens: list[str], top_n: int) -> dict[str, Any]:
    content = []
    for token in tokens:
        stripped = token.strip()
        if stripped.isdigit():
            digit = int(stripped)
            spread = {digit: 0.7, digit - 1: 0.2, digit + 1: 0.1}
            alternatives = [
                {"token": token.replace(stripped, str(d)), "logprob": math.log(p), "bytes": None}
                for d, p in spread.items()
                if 0 <= d <= 9
            ]
        else:
            alternatives = [{"token": token, "logprob": 0.0, "bytes": None}]
        content.append({**alternatives[0], "top_logprobs": alternatives[:top_n]})
    return {"content": content, "refusal": None}


class FakeOpenAIServer:
    """An OpenAI-compatible chat server on 127.0.0.1, used as a context manager.

    ``reply(body) -> str`` chooses the answer text from the request's JSON body (default: a fixed
    ``Rating: 5`` answer); ``respond(body) -> (status, json)`` instead gives the whole answer, status
    and JSON body as they are (a recorded exchange of a real server, replayed), or ``None`` to answer
    as usual. ``requests`` lists the JSON bodies received and ``headers`` their HTTP
    headers (names in lower case); ``max_in_flight`` is the peak number of requests handled at once.
    """

    def __init__(
        self,
        *,
        delay: float = 0.0,
        reply: Callable[[dict], str] | None = None,
        respond: Callable[[dict], tuple[int, Any] | None] | None = None,
        fault: str | None = None,
        schedule: FaultSchedule | None = None,
        api_key: str | None = None,
        models: Sequence[str] | None = None,
        kill_sender_at: int | None = None,
    ):
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; choose from {', '.join(FAULTS)}")
        self.delay = delay
        self.reply = reply or (lambda body: DEFAULT_REPLY)
        self.respond = respond
        self.fault = fault
        self.schedule = schedule
        self.api_key = api_key
        self.models = None if models is None else tuple(models)
        self.kill_sender_at = kill_sender_at
        self.killed: list[int] = []
        """Process ids killed by ``kill_sender_at``."""
        self.faults: list[str | None] = []
        """The fault (or ``None``) each chat request got, in arrival order."""
        self.model_lists = 0
        """``GET /v1/models`` requests answered (the preflight's)."""
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.base_url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _refused(self, request: Request) -> Response | None:
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            error = {"message": "Incorrect API key provided", "type": "invalid_request_error"}
            return JSONResponse({"error": {**error, "code": "invalid_api_key"}}, 401)
        return None

    async def _list_models(self, request: Request) -> Response:
        self.model_lists += 1
        refused = self._refused(request)
        if refused is not None:
            return refused
        listed = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models or ()]
        return JSONResponse({"object": "list", "data": listed})

    async def _chat(self, request: Request) -> Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            body = await request.json()
            number = len(self.requests)
            self.requests.append(body)
            self.headers.append(dict(request.headers))
            if self.kill_sender_at == number + 1 and request.client is not None:
                self._kill_sender(request.client.port)
            refused = self._refused(request)
            if refused is not None:
                return refused
            if self.models is not None and body.get("model") not in self.models:
                message = f"The model `{body.get('model')}` does not exist."
                error = {"message": message, "type": "invalid_request_error", "code": "model_not_found"}
                return JSONResponse({"error": error}, 404)
            fault = self.schedule.fault(number) if self.schedule is not None else self.fault
            self.faults.append(fault)
            await asyncio.sleep(self.delay)
            return await self._answer(body, fault)
        finally:
            self.in_flight -= 1

    def _kill_sender(self, client_port: int) -> None:
        pid = sender_pid(client_port, int(self.base_url.rsplit(":", 1)[1].split("/")[0]))
        if pid is None or pid == os.getpid():
            raise RuntimeError(
                f"kill_sender_at: the sender of request {self.kill_sender_at} is not another process"
            )
        os.kill(pid, signal.SIGKILL)
        self.killed.append(pid)

    async def _answer(self, body: dict, fault: str | None) -> Response:
        if fault == "500":
            return JSONResponse({"error": {"message": "injected failure", "type": "server_error"}}, 500)
        if fault == "429":
            error = {"error": {"message": "slow down", "type": "rate_limit"}}
            return JSONResponse(error, 429, headers={"Retry-After": "0.1"})
        if fault == "hang":
            assert self._stopping is not None
            await self._stopping.wait()
            return Response(status_code=503)
        if fault == "empty":
            return Response(b"", media_type="application/json")
        if fault == "non-json":
            return Response(b"<html>this is not JSON</html>", media_type="application/json")
        answer = self.respond(body) if self.respond is not None and fault is None else None
        if answer is not None:
            return JSONResponse(answer[1], answer[0])
        text = NONSENSE_REPLY if fault == "nonsense" else self.reply(body)
        tokens = _tokens(text)
        prompt_tokens = sum(len(_tokens(str(m.get("content", "")))) + 4 for m in body.get("messages", []))
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": text},
            "logprobs": _logprobs(tokens, int(body.get("top_logprobs") or 1))
            if body.get("logprobs")
            else None,
        }
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "fake"),
                "choices": [choice],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": len(tokens),
                    "total_tokens": prompt_tokens + len(tokens),
                },
            }
        )

    def _run(self, sock: socket.socket, ready: threading.Event) -> None:
        async def serve() -> None:
            self._stopping = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            assert self._server is not None
            task = asyncio.create_task(self._server.serve(sockets=[sock]))
            while not self._server.started and not task.done():
                await asyncio.sleep(0.01)
            ready.set()
            await task

        asyncio.run(serve())

    def __enter__(self) -> FakeOpenAIServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._socket = sock
        self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._list_models, methods=["GET"]),
            ]
        )
        config = uvicorn.Config(app, log_level="warning", backlog=4096, timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(sock, ready), daemon=True, name="fake-openai")
        self._thread.start()
        if not ready.wait(timeout=30):
            raise RuntimeError("the fake OpenAI server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        if self._loop is not None and self._stopping is not None:
            # Wake hanging handlers so the graceful shutdown does not wait for them.
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()


LLAMACPP_MODEL = "smollm2"
"""The name :func:`llama_cpp_server` serves the embedded GGUF under."""
LLAMACPP_STARTUP_SECONDS = 180


def llama_cpp_missing() -> str | None:
    """Why :func:`llama_cpp_server` cannot run here (``None``: it can)."""
    for module in ("llama_cpp", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed: pip install 'llama-cpp-python[server]' (builds llama.cpp from source)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def llama_cpp_server(threads: int, log: Path) -> Iterator[str]:
    """A real llama.cpp server (``python -m llama_cpp.server``) on 127.0.0.1 serving the embedded GGUF as
    :data:`LLAMACPP_MODEL` with ``threads`` threads; yields its base URL, stops it on exit. Its
    output goes to ``log``."""
    port = _free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(embedded_gguf_path()), "--model_alias", LLAMACPP_MODEL, "--n_ctx", "4096",
        "--n_threads", str(threads), "--n_threads_batch", str(threads),
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + LLAMACPP_STARTUP_SECONDS
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {server.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"llama_cpp.server did not answer in {LLAMACPP_STARTUP_SECONDS} s; see {log}"
                    ) from None
                time.sleep(0.5)
        yield url
    finally:
        stop_process(server, 30.0)
