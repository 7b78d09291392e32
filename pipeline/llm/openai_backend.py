"""Any OpenAI-compatible chat server (OpenAI, vLLM, Ollama, llama.cpp, ``transformers serve``).

Built on ``openai.AsyncOpenAI``: one client per endpoint, reused for every call, with the client's
own timeouts, retries and backoff (``Retry-After`` honoured). Its HTTP transport is aiohttp
(``openai[aiohttp]``: about half the client CPU per call of the default) or httpx
(``spec.transport``). A call that still fails raises :class:`LLMError`; the openai/transport
exception is kept as its ``__cause__``. A 200 answer with an empty or unreadable body raises
:class:`TransientError`, which the layer above retries (the client takes any 200 as final).

:meth:`OpenAIBackend.check` is the preflight: one cheap request that turns a closed port, a refused
key or a model the server does not serve into a :class:`BackendLoadError` before a run starts.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

import httpx2
import openai
from openai.types.chat import ChatCompletion

from pipeline.errors import BackendLoadError
from pipeline.llm.base import (
    BackendSpec,
    ChatBackend,
    Completion,
    LLMError,
    Message,
    Rating,
    TransientError,
    Usage,
)
from pipeline.llm.ratings import (
    distribution_from_logprobs,
    expected_score,
    find_rating_position,
    parse_reason,
    rating_from_text,
    rating_schema,
    read_rating_json,
)

PLACEHOLDER_API_KEY = "EMPTY"
"""Sent when the key's environment variable is unset: local servers accept any key."""

TOP_LOGPROBS = 20  # the most OpenAI allows; vLLM's default cap is 20 as well
_BEARER: Any = {"security": {"bearer_auth": True}}
"""Request options of a chat call: the API key as a bearer token, as ``chat.completions.create`` sends it."""
BARE_RATING_MAX_TOKENS = 16
"""Token limit of a rating without reason: room for ``{"rating": 5}`` (about 10 tokens) or ``Rating: 5``."""
RatingForm = Literal["json_schema", "json_object", "plain"]
_NEXT_FORM: dict[RatingForm, RatingForm] = {"json_schema": "json_object", "json_object": "plain"}
_FORM_REJECTED = (400, 422, 500)
"""How servers refuse a ``response_format`` they do not take (llama-cpp-python: a 500 validation error)."""
PREFLIGHT_TIMEOUT = 10.0
"""Seconds the preflight waits for an endpoint (at most; less when ``spec.timeout`` is lower)."""


KEEPALIVE_SECONDS = 2.0
"""How long an idle connection is kept for reuse: less than the 5 s after which uvicorn (vLLM,
``transformers serve``) closes it, so a connection the server is closing is never picked for a
request ("Server disconnected"; under load such failures came in bursts that tripped the breaker)."""


def transport_client(spec: BackendSpec) -> Any:
    """The client's HTTP transport for ``spec.transport``, with the client's connection limits and
    timeouts and a keep-alive shorter than servers' (:data:`KEEPALIVE_SECONDS`).

    ``DefaultAioHttpClient`` raises a RuntimeError naming the missing extra when aiohttp is not
    installed.
    """
    default = openai.DEFAULT_CONNECTION_LIMITS
    limits = httpx2.Limits(
        max_connections=default.max_connections,
        max_keepalive_connections=default.max_keepalive_connections,
        keepalive_expiry=KEEPALIVE_SECONDS,
    )
    if spec.transport == "aiohttp":
        return openai.DefaultAioHttpClient(limits=limits)
    return openai.DefaultAsyncHttpxClient(limits=limits)


def rating_response_format(form: RatingForm, schema: dict[str, Any]) -> dict[str, Any] | None:
    """The ``response_format`` asking for a rating answer shaped by ``schema`` in ``form``.

    ``json_schema`` is OpenAI's form (vLLM, llama.cpp's ``llama-server``, OpenAI); ``json_object``
    with a ``schema`` is llama-cpp-python's; ``plain`` asks for free text (``None``: no field).
    """
    if form == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "rating", "strict": True, "schema": schema}}
    if form == "json_object":
        return {"type": "json_object", "schema": schema}
    return None


class _FormRejected(Exception):
    """The server refused a rating's ``response_format`` (a 400, 422 or 500 answer)."""


class OpenAIBackend(ChatBackend):
    """One OpenAI-compatible endpoint (``base_url``) serving ``spec.model``.

    Ratings ask for a structured answer (:func:`~pipeline.llm.ratings.rating_schema`, the rating
    first) with ``logprobs``, and read the score from the rating digit's log-probabilities,
    renormalised over ``1..scale``; without them from the answer's JSON, then from its text; else
    the score stays ``None``. The endpoint's ``response_format`` is found on its first ratings:
    OpenAI's ``json_schema`` form, else llama-cpp-python's ``json_object`` with a schema, else none
    (a server that refuses both with a 400, 422 or 500); the first form answered is kept, like the
    log-probabilities: servers that ignore them (``transformers serve``) or reject them with a
    400/422 are then rated from the answer's text and no longer asked for them.
    """

    def __init__(self, spec: BackendSpec, base_url: str, *, http_client: Any = None):
        if not spec.model:
            raise ValueError("an OpenAI-compatible backend needs spec.model (the served model's name)")
        self.spec = spec
        self.model_name = spec.model
        self.identity = base_url
        self._logprobs = spec.use_logprobs
        self._form: RatingForm = "json_schema"
        self._form_answered: RatingForm | None = None
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=os.environ.get(spec.api_key_env) or PLACEHOLDER_API_KEY,
            timeout=spec.timeout,
            max_retries=spec.max_retries,
            http_client=http_client or transport_client(spec),
        )

    async def _create(
        self,
        messages: list[Message],
        params: dict[str, Any],
        logprobs: bool,
        response_format: dict[str, Any] | None = None,
        probing: bool = False,
    ) -> ChatCompletion:
        """One chat request; ``probing``: a refusal of ``response_format`` raises :class:`_FormRejected`."""
        extra: dict[str, Any] = {"logprobs": True, "top_logprobs": TOP_LOGPROBS} if logprobs else {}
        if response_format is not None:
            extra["response_format"] = response_format
        body = {"model": self.model_name, "messages": messages, **self.spec.sampling(**params), **extra}
        try:
            # The client's documented low-level call: its retries, timeouts, auth and transport, without
            # ``chat.completions.create``'s walk of every message through openai's TypedDict
            # transforms (a third of the client's CPU per call; our body is plain JSON already).
            return await self._client.post(
                "/chat/completions", cast_to=ChatCompletion, body=body, options=_BEARER
            )
        except openai.APIStatusError as exc:
            if probing and exc.status_code in _FORM_REJECTED:
                raise _FormRejected from exc
            if logprobs and exc.status_code in (400, 422):
                self._logprobs = False
                return await self._create(messages, params, False, response_format)
            raise LLMError(f"{self.identity}: {exc.message}") from exc
        except openai.APIError as exc:
            raise LLMError(f"{self.identity}: {type(exc).__name__}: {exc}") from exc
        except ValueError as exc:  # an empty or non-JSON body fails to decode
            raise TransientError(f"{self.identity}: unreadable response body: {exc}") from exc

    def _read(self, response: ChatCompletion) -> tuple[str, Usage, dict[str, Any]]:
        """Text, usage and raw JSON of a response; a malformed one raises :class:`LLMError`."""
        # The client does not validate response bodies, so a broken server yields odd objects.
        try:
            text = response.choices[0].message.content
            usage = response.usage
            raw = response.model_dump(mode="json")
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
            raise TransientError(f"{self.identity}: malformed response: {response!r:.200}") from exc
        if not isinstance(text, str):
            raise TransientError(f"{self.identity}: response without message content: {response!r:.200}")
        tokens = Usage(
            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
        )
        return text, tokens, raw

    async def complete(self, messages: list[Message], *, sample_index: int = 0, **params: Any) -> Completion:
        text, usage, raw = self._read(await self._create(messages, params, logprobs=False))
        return Completion(text=text, model=self.model_name, usage=usage, response=raw)

    async def rate(
        self,
        messages: list[Message],
        *,
        scale: int = 7,
        sample_index: int = 0,
        reason: bool = True,
        **params: Any,
    ) -> Rating:
        if not reason:
            params["max_tokens"] = min(params.get("max_tokens", self.spec.max_tokens), BARE_RATING_MAX_TOKENS)
        response = await self._rating_response(messages, params, rating_schema(scale, reason=reason))
        text, usage, raw = self._read(response)
        distribution = self._distribution(response, scale)
        if distribution is None:
            self._logprobs = self._logprobs and _has_logprobs(response)
        json_score, json_reason = read_rating_json(text, scale)
        said = "" if not reason else json_reason if json_reason is not None else parse_reason(text)
        if distribution is None and json_score is None:
            rating = rating_from_text(text, scale=scale, model=self.model_name, usage=usage, response=raw)
            return dataclasses.replace(rating, reason=said)
        return Rating(
            score=expected_score(distribution) if distribution else json_score,
            reason=said,
            raw=text,
            method="logprobs" if distribution else "parsed",
            model=self.model_name,
            scale=scale,
            distribution=distribution,
            usage=usage,
            response=raw,
        )

    async def _rating_response(
        self, messages: list[Message], params: dict[str, Any], schema: dict[str, Any]
    ) -> ChatCompletion:
        """A rating's response in the endpoint's form, found on its first ratings (see the class)."""
        while True:
            form = self._form
            try:
                response = await self._create(
                    messages,
                    params,
                    logprobs=self._logprobs,
                    response_format=rating_response_format(form, schema),
                    probing=form not in ("plain", self._form_answered),
                )
            except _FormRejected:
                if self._form == form:  # not already moved on by a concurrent rating
                    self._form = _NEXT_FORM[form]
                continue
            self._form_answered = form
            return response

    @staticmethod
    def _distribution(response: ChatCompletion, scale: int) -> dict[int, float] | None:
        """The rating distribution from the rating digit's ``top_logprobs``, when the server sent them."""
        if not _has_logprobs(response):
            return None
        content = response.choices[0].logprobs.content
        position = find_rating_position([entry.token for entry in content], scale)
        if position is None:
            return None
        top = {alt.token: alt.logprob for alt in content[position].top_logprobs or []}
        return distribution_from_logprobs(top, scale)

    async def check(self) -> None:
        """The preflight: list the endpoint's models once, without retries.

        Raises :class:`BackendLoadError` (one line, no key in it) for an endpoint that cannot be
        reached, refuses the key, or does not serve ``spec.model``. A server error or an odd
        answer passes: the run's own retries deal with those.
        """
        client = self._client.with_options(max_retries=0, timeout=min(self.spec.timeout, PREFLIGHT_TIMEOUT))
        try:
            try:
                served = [model.id for model in (await client.models.list()).data]
            except openai.NotFoundError:  # no model list here: ask for one token instead
                await client.chat.completions.create(
                    model=self.model_name, messages=[{"role": "user", "content": "ping"}], max_tokens=1
                )
                return
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            where = f"${self.spec.api_key_env}" if os.environ.get(self.spec.api_key_env) else "no key"
            raise BackendLoadError(
                f"{self.identity} refused the API key (HTTP {exc.status_code}; sent {where}, "
                f"set api_key_env to the variable holding the key)"
            ) from exc
        except openai.NotFoundError as exc:
            raise BackendLoadError(f"{self.identity} does not serve model {self.model_name!r}") from exc
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            detail = " ".join(str(cause).split()) or type(cause).__name__
            raise BackendLoadError(f"cannot reach {self.identity}: {detail}") from exc
        except (openai.APIError, ValueError):
            return
        if served and self.model_name not in served:
            shown = ", ".join(sorted(served)[:5]) + (", ..." if len(served) > 5 else "")
            raise BackendLoadError(
                f"{self.identity} does not serve model {self.model_name!r} (it serves: {shown})"
            )

    async def aclose(self) -> None:
        await self._client.close()


def _has_logprobs(response: ChatCompletion) -> bool:
    logprobs = getattr(response.choices[0], "logprobs", None)
    return bool(logprobs is not None and getattr(logprobs, "content", None))
