"""An in-process transformers model that batches concurrent requests.

Calls put their request on a queue and await a future. One worker thread owns the model: it takes
the oldest request, gathers whatever else arrived meanwhile (waiting at most ``batch_wait_ms`` when
the queue is empty) up to ``max_batch_size`` compatible requests, and runs them as one left-padded
``generate`` (or one forward pass for rating digits). The event loop never waits on the model.

Ratings come from log-probabilities: the assistant turn is prefilled with the rating contract's
``Rating:`` label and the next-token distribution over the digits ``1..scale`` (renormalised) gives
the score's expected value; the reason, when asked for, is then generated after
``Rating: <most likely digit>`` and the ``Reason:`` label on the next line (``pipeline.llm.ratings``).

Scoring calls read log-probabilities of given text in one forward pass: the next token's over a
few candidates (batched with ratings that ask for the same tokens) and a continuation's summed over
its tokens (continuations of any length share a batch; only the last positions' logits are kept).
Ratings of one kind open with the same instructions and worked examples: a batch runs the prefix its
prompts share once and each row only its own tokens after it.

Sampling (temperature > 0) is seeded per request: each request draws its tokens from its own
generator, seeded from the request (messages, prefill and ``sample_index``, :func:`request_seed`),
so its draws do not depend on which other requests share its batch. Its logits still do, through
the batch's shape: 24 sampled answers generated as one batch and as batches of 5 (same seeds, the
embedded model) were the same in 23 of 24 in float32 but in only 8 of 24 in bfloat16, and which
requests share a batch depends on when they arrive. A run is repeatable through its response cache;
without it, a float32 run nearly is.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.llm.base import (
    BackendSpec,
    ChatBackend,
    Completion,
    LLMError,
    LogProbs,
    Message,
    Rating,
    Usage,
)
from pipeline.llm.ratings import (
    RATING_PREFIX,
    REASON_PREFIX,
    SCALE,
    rating_answer,
    rating_from_text,
    trim_reason,
)

_SAMPLING_KEYS = frozenset({"temperature", "top_p", "max_tokens"})

SAMPLER = "seeded-v2"
"""How sampled tokens are drawn (:class:`_SeededSampler`); part of the cache identity."""

SHARED_PREFIX_MIN = 32
"""Fewest prompt tokens common to a scoring batch that are run once for all of its rows (:meth:`LocalBackend._score`)."""

CONTINUATION_PAD_RATIO = 1.5
"""Longest over shortest row of one part of a continuation batch (:meth:`LocalBackend._continuation`)."""


def length_buckets(lengths: Sequence[int], ratio: float) -> list[list[int]]:
    """The indices of ``lengths`` in parts of similar length, shortest first: each part's longest row
    is at most ``ratio`` times its shortest, so padding to the longest costs at most that factor."""
    parts: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        if parts and lengths[index] <= ratio * lengths[parts[-1][0]]:
            parts[-1].append(index)
        else:
            parts.append([index])
    return parts


@dataclass
class _Request:
    """One prompt waiting for the model. Requests share a batch only when their ``key`` is equal."""

    key: tuple
    messages: list[Message]
    prefill: list[int]
    seed: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(repr=False)


@dataclass(frozen=True)
class _Generated:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    lead_logprobs: list[float] | None = None
    """With a :class:`_Lead`: the log-probabilities of its candidate tokens at the first step."""


@dataclass(frozen=True)
class _Lead:
    """How a generation starts: the most likely of ``candidates`` (their log-probabilities are
    kept), then the ``then`` tokens, forced; the free text follows. A rating reads its digit and
    writes its reason in one generation, so the prompt is encoded once, not once per part."""

    candidates: tuple[int, ...]
    then: tuple[int, ...]


class _ForcedLead:
    """A logits processor that reads the lead's candidate log-probabilities at the first step and
    forces the lead's tokens (the most likely candidate, then ``then``); later steps pass through."""

    def __init__(self, lead: _Lead, prompt_width: int):
        self.lead = lead
        self.prompt_width = prompt_width
        self.logprobs: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        step = input_ids.shape[1] - self.prompt_width
        if step > len(self.lead.then):
            return scores
        candidates = torch.tensor(self.lead.candidates, device=scores.device)
        if step == 0:
            self.logprobs = torch.log_softmax(scores.float(), dim=-1)[:, candidates]
            forced = candidates[self.logprobs.argmax(dim=-1)]
        else:
            forced = torch.full((scores.shape[0],), self.lead.then[step - 1], device=scores.device)
        return torch.full_like(scores, float("-inf")).scatter_(-1, forced[:, None], 0.0)


class _LineEnd:
    """A stopping criterion: a row is done at a line-break token generated after ``start`` tokens."""

    def __init__(self, start: int, line_breaks: set[int], device: Any):
        import torch

        self.start = start
        self.line_breaks = torch.tensor(sorted(line_breaks), device=device)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.isin(input_ids[:, -1], self.line_breaks) & (input_ids.shape[1] > self.start)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def request_seed(messages: list[Message], prefill: list[int], sample_index: int) -> int:
    """The seed of one request's sampling: a hash of everything that identifies the request.

    Callers keep requests apart through ``sample_index`` (the simulation derives it from the run
    seed, world, round, agent and call); the messages make unrelated requests differ as well.
    """
    payload = json.dumps([messages, prefill, sample_index], sort_keys=True, ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(payload.encode()).digest()[:8], "big")


NUCLEUS_CANDIDATES = 256
"""Nucleus sampling looks for the nucleus among this many most likely tokens first: sorting the whole
vocabulary (49k tokens for SmolLM2) cost about as much per step as the 135M model's forward pass."""


class _SeededSampler:
    """A logits processor that draws each row's next token with that row's own generator.

    It returns scores that are ``-inf`` everywhere but at the drawn token, so greedy decoding
    (``do_sample=False``) emits the draw. The draw is temperature scaling, nucleus (top-p)
    filtering and one uniform number per row and step from the row's generator (inverse CDF over
    the probabilities in descending order): a row's tokens depend only on its own seed and logits,
    never on the other rows of the batch. The nucleus is found among the
    :data:`NUCLEUS_CANDIDATES` most likely tokens, or the whole sorted vocabulary when they hold
    less than ``top_p``; without top-p filtering the CDF runs over the vocabulary in its own order.
    """

    def __init__(self, generators: list[Any], temperature: float, top_p: float):
        self.generators = generators
        self.temperature = temperature
        self.top_p = top_p

    def _candidates(self, probs: Any) -> tuple[Any, Any]:
        """Probabilities in the order the CDF runs over, and their token ids."""
        import torch

        if self.top_p >= 1.0:
            order = torch.arange(probs.shape[-1], device=probs.device).expand_as(probs)
            return probs, order
        ordered, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
        if bool((ordered.sum(-1) < self.top_p).any()):
            ordered, order = probs.sort(dim=-1, descending=True, stable=True)
        # Nucleus: keep the most likely tokens until their mass reaches top_p (the first always).
        return ordered.masked_fill(ordered.cumsum(-1) - ordered >= self.top_p, 0.0), order

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        ordered, order = self._candidates(torch.softmax(scores.float() / self.temperature, dim=-1))
        cumulative = ordered.cumsum(-1)
        uniform = torch.stack([torch.rand((), generator=g, device=g.device) for g in self.generators]).to(
            cumulative.device
        )
        draws = (uniform * cumulative[:, -1])[:, None]
        picks = torch.searchsorted(cumulative, draws, right=True).clamp(max=cumulative.shape[-1] - 1)
        tokens = order.gather(-1, picks)
        return torch.full_like(scores, float("-inf")).scatter_(-1, tokens, 0.0)


def weights_fingerprint(model_path: str | Path) -> str:
    """A short hash of a model folder's config and weight files (names, sizes, times).

    Part of the cache identity, so a model retrained into the same folder is never answered
    from the cache of its previous weights. A Hub name (not a folder) has no fingerprint.
    """
    folder = Path(model_path)
    if not folder.is_dir():
        return ""
    files = sorted(
        p for p in folder.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin")
    )
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(repr(stats).encode()).hexdigest()[:12]


class LocalBackend(ChatBackend):
    """A Hugging Face causal LM folder (or Hub name) run in-process with request batching.

    ``batch_sizes`` records the size of every model invocation, for tests and benchmarks.
    Greedy when the temperature is 0; otherwise sampled with a seed per request (see the module
    docstring), so a sampled answer does not depend on which requests shared its batch.
    ``identity`` (the cache's name for this model) includes the weights' dtype and the sampler.
    """

    def __init__(
        self,
        model_path: str | Path,
        spec: BackendSpec,
        *,
        model_name: str | None = None,
        identity: str | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.precision import usable_dtype

        if spec.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {spec.max_batch_size}")
        self.spec = spec
        self.model_name = model_name or str(model_path)
        self.batch_sizes: list[int] = []
        self.shared_prefix_tokens: list[int] = []
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if not self.tokenizer.chat_template:
            raise ValueError(
                f"{model_path}: the tokenizer has no chat template; use an instruction-tuned model"
            )
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = (
            getattr(torch, usable_dtype(spec.dtype, device))
            if spec.dtype != "auto"
            else torch.float32
            if device == "cpu"
            else "auto"
        )
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        name = identity or f"local:{self.model_name}@{weights_fingerprint(model_path)}"
        self._scoring_model = f"{name}|{str(self.model.dtype).removeprefix('torch.')}"
        self.identity = f"{self._scoring_model}|{SAMPLER}"
        eos = self.model.generation_config.eos_token_id
        self._eos_ids = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self._rating_tokens: dict[int, tuple[list[int], dict[int, int]] | None] = {}
        self._line_breaks: set[int] | None = None
        self._closed = False
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._work, name=f"llm-{Path(self.model_name).name}", daemon=True
        )
        self._thread.start()

    # -- event-loop side -------------------------------------------------------------------------

    def _sampling(self, params: dict[str, Any]) -> dict[str, Any]:
        unknown = set(params) - _SAMPLING_KEYS
        if unknown:
            raise ValueError(
                f"the local backend does not support {sorted(unknown)}; use {sorted(_SAMPLING_KEYS)}"
            )
        return self.spec.sampling(**params)

    async def _submit(self, key: tuple, messages: list[Message], prefill: list[int], seed: int = 0) -> Any:
        if self._closed:
            raise LLMError(f"{self.identity}: the backend is closed")
        loop = asyncio.get_running_loop()
        request = _Request(key, messages, prefill, seed, loop, loop.create_future())
        self._queue.put(request)
        return await request.future

    async def _generate(
        self,
        messages: list[Message],
        prefill: list[int],
        sampling: dict[str, Any],
        sample_index: int,
        *,
        one_line: bool = False,
        lead: _Lead | None = None,
    ) -> _Generated:
        """Generate after the prompt and ``prefill``, starting with ``lead`` when given; ``one_line``
        stops at the first line break of the free text."""
        key = (
            "generate",
            int(sampling["max_tokens"]),
            float(sampling["temperature"]),
            float(sampling["top_p"]),
            one_line,
            lead,
        )
        return await self._submit(key, messages, prefill, request_seed(messages, prefill, sample_index))

    async def complete(self, messages: list[Message], *, sample_index: int = 0, **params: Any) -> Completion:
        out = await self._generate(messages, [], self._sampling(params), sample_index)
        usage = Usage(prompt_tokens=out.prompt_tokens, completion_tokens=len(out.token_ids))
        return Completion(text=out.text, model=self.model_name, usage=usage)

    def rating_tokens(self, scale: int) -> tuple[list[int], dict[int, int]] | None:
        """Token ids of the ``Rating: `` prefill and of each digit ``1..scale`` that follows it.

        ``None`` when the digits are not single tokens after one shared prefill (e.g. ``10``).
        """
        if scale not in self._rating_tokens:
            encoded = {
                d: self.tokenizer.encode(f"{RATING_PREFIX} {d}", add_special_tokens=False)
                for d in range(1, scale + 1)
            }
            prefill = encoded[1][:-1]
            digits = {d: ids[-1] for d, ids in encoded.items()}
            shared = (
                all(ids[:-1] == prefill for ids in encoded.values()) and len(set(digits.values())) == scale
            )
            self._rating_tokens[scale] = (prefill, digits) if shared else None
        return self._rating_tokens[scale]

    async def rate(
        self,
        messages: list[Message],
        *,
        scale: int = SCALE,
        sample_index: int = 0,
        reason: bool = True,
        **params: Any,
    ) -> Rating:
        sampling = self._sampling(params)
        tokens = self.rating_tokens(scale)
        if tokens is None:
            out = await self._generate(messages, [], sampling, sample_index)
            usage = Usage(prompt_tokens=out.prompt_tokens, completion_tokens=len(out.token_ids))
            return rating_from_text(out.text, scale=scale, model=self.model_name, usage=usage)
        prefill, digits = tokens
        text, completion_tokens = "", 1
        if reason:
            # One generation reads the digit and writes the reason after ``Rating: <digit>`` and the
            # ``Reason:`` label. The reason is the rest of that line: stopping at its end instead of
            # letting the model write further worked examples up to max_tokens cut a neighbour rating's
            # time by a fifth (16 ratings of the embedded model: 84 -> 67 s, 1 thread, loaded machine).
            label = self.tokenizer.encode(f"\n{REASON_PREFIX}", add_special_tokens=False)
            lead = _Lead(tuple(digits.values()), tuple(label))
            out = await self._generate(messages, prefill, sampling, sample_index, one_line=True, lead=lead)
            logprobs, prompt_tokens = out.lead_logprobs, out.prompt_tokens
            text, completion_tokens = out.text.strip(), 1 + len(out.token_ids)
        else:
            logprobs, prompt_tokens = await self._submit(("score", tuple(digits.values())), messages, prefill)
        mass = sum(math.exp(lp) for lp in logprobs)
        distribution = {d: math.exp(lp) / mass for d, lp in zip(digits, logprobs, strict=True)}
        best = max(distribution, key=distribution.__getitem__)
        return Rating(
            score=sum(d * p for d, p in distribution.items()),
            reason=trim_reason(text),
            raw=rating_answer(best, text) if reason else f"{RATING_PREFIX} {best}",
            method="logprobs",
            model=self.model_name,
            scale=scale,
            distribution=distribution,
            usage=Usage(prompt_tokens=prompt_tokens - len(prefill), completion_tokens=completion_tokens),
            response={"digit_probability_mass": mass},
        )

    @property
    def scoring_model(self) -> str | None:
        return self._scoring_model

    async def next_token_logprobs(self, messages: list[Message], candidates: list[str]) -> LogProbs:
        encoded = {c: self.tokenizer.encode(c, add_special_tokens=False) for c in candidates}
        single = [c for c in candidates if len(encoded[c]) == 1]
        longer = [c for c in candidates if len(encoded[c]) != 1]
        values: dict[str, float] = {}
        prompt_tokens = 0
        if single:
            logprobs, prompt_tokens = await self._submit(
                ("score", tuple(encoded[c][0] for c in single)), messages, []
            )
            values |= dict(zip(single, logprobs, strict=True))
        # A candidate this tokenizer splits is scored as a continuation: the sum over its tokens.
        for candidate, scored in zip(
            longer,
            await asyncio.gather(*(self.continuation_logprob(messages, c) for c in longer)),
            strict=True,
        ):
            values[candidate] = scored.values[candidate]
            prompt_tokens = scored.usage.prompt_tokens
        return LogProbs(
            values={c: values[c] for c in candidates},
            model=self.model_name,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=0),
        )

    async def continuation_logprob(self, messages: list[Message], continuation: str) -> LogProbs:
        ids = self.tokenizer.encode(continuation, add_special_tokens=False)
        if not ids:
            raise ValueError("continuation_logprob needs a non-empty continuation")
        total, prompt_tokens = await self._submit(("continuation",), messages, ids)
        return LogProbs(
            values={continuation: total},
            model=self.model_name,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=0),
        )

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)

    # -- worker-thread side ----------------------------------------------------------------------

    def _work(self) -> None:
        pending: list[_Request] = []
        closing = False
        while not closing or pending:
            if not pending:
                first = self._queue.get()
                if first is None:
                    return
                pending.append(first)
            deadline = time.monotonic() + self.spec.batch_wait_ms / 1000
            while not closing and sum(r.key == pending[0].key for r in pending) < self.spec.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                else:
                    pending.append(item)
            batch = [r for r in pending if r.key == pending[0].key][: self.spec.max_batch_size]
            pending = [r for r in pending if all(r is not b for b in batch)]
            self._run(batch)

    def _run(self, batch: list[_Request]) -> None:
        try:
            kind = batch[0].key[0]
            results = (
                self._score(batch)
                if kind == "score"
                else self._continuation(batch)
                if kind == "continuation"
                else self._generate_batch(batch)
            )
            errors: list[BaseException | None] = [None] * len(batch)
        except Exception as exc:  # one failing batch must not kill the worker
            error = LLMError(f"{self.identity}: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            results, errors = [None] * len(batch), [error] * len(batch)
        for request, result, error in zip(batch, results, errors, strict=True):
            with contextlib.suppress(RuntimeError):  # the caller's event loop is closed
                request.loop.call_soon_threadsafe(_resolve, request.future, result, error)

    def _prompt_ids(self, batch: list[_Request]) -> list[list[int]]:
        """The token ids of each request's prompt through the chat template, then its prefill."""
        return [
            self.tokenizer.encode(
                self.tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False),
                add_special_tokens=False,
            )
            + r.prefill
            for r in batch
        ]

    def _pad(self, ids: list[list[int]], start: int = 0) -> Any:
        """Left-padded input ids, attention mask and position ids (counting from ``start``)."""
        inputs = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(
            self.model.device
        )
        # Positions count real tokens only, so a padded prompt sees the same positions as alone.
        inputs["position_ids"] = start + (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return inputs

    def _encode(self, batch: list[_Request]) -> tuple[Any, list[int]]:
        """Left-padded input ids, attention mask and position ids of the prompts (plus prefills)."""
        ids = self._prompt_ids(batch)
        return self._pad(ids), [len(i) for i in ids]

    def _score(self, batch: list[_Request]) -> list[tuple[list[float], int]]:
        """Each request's log-probabilities of the key's candidate tokens next, and its prompt length.

        Prompts of one kind of rating share their system message, instructions and worked examples, most
        of their tokens. The rows are split by their first ``SHARED_PREFIX_MIN`` tokens (a batch can mix
        kinds: observer and neighbour ratings ask for the same digits); in each part, the prefix its rows
        share is run once and its keys and values serve every row, which then runs only its own tokens.
        """
        ids = self._prompt_ids(batch)
        self.batch_sizes.append(len(batch))
        parts: dict[tuple[int, ...], list[int]] = {}
        for row, tokens in enumerate(ids):
            parts.setdefault(tuple(tokens[:SHARED_PREFIX_MIN]), []).append(row)
        logprobs: list[list[float]] = [[] for _ in batch]
        for rows in parts.values():
            logits = self._next_token_logits([ids[row] for row in rows])
            chosen = self._torch.log_softmax(logits.float(), dim=-1)[:, list(batch[0].key[1])]
            for row, values in zip(rows, chosen.tolist(), strict=True):
                logprobs[row] = values
        return list(zip(logprobs, [len(i) for i in ids], strict=True))

    def _next_token_logits(self, ids: list[list[int]]) -> Any:
        """The next-token logits after each prompt (``[N, vocabulary]``), their common prefix run once."""
        torch = self._torch
        shortest = min(len(i) for i in ids)
        common = next(
            (n for n, column in enumerate(zip(*ids, strict=False)) if len(set(column)) > 1), shortest
        )
        shared = min(common, shortest - 1)
        with torch.inference_mode():
            if len(ids) == 1 or shared < SHARED_PREFIX_MIN:
                return self.model(**self._pad(ids), logits_to_keep=1).logits[:, -1, :]
            prefix = torch.tensor([ids[0][:shared]], device=self.model.device)
            cache = self.model(input_ids=prefix, use_cache=True).cache
            cache.batch_repeat_interleave(len(ids))
            inputs = self._pad([i[shared:] for i in ids], start=shared)
            seen = torch.ones(len(ids), shared, dtype=inputs["attention_mask"].dtype, device=prefix.device)
            inputs["attention_mask"] = torch.cat([seen, inputs["attention_mask"]], dim=1)
            self.shared_prefix_tokens.append(shared)
            return self.model(**inputs, cache=cache, logits_to_keep=1).logits[:, -1, :]

    def _continuation(self, batch: list[_Request]) -> list[tuple[float, int]]:
        """Each request's prefill (its continuation) log-probability, summed over its tokens, and the
        length of the prompt before it.

        Rows run in parts of similar length (:func:`length_buckets`): the judge's exemplar contexts are
        several times longer than its other prompts, and one padded batch would pad every row to them.
        """
        ids = self._prompt_ids(batch)
        self.batch_sizes.append(len(batch))
        results: list[tuple[float, int]] = [(0.0, 0)] * len(batch)
        for rows in length_buckets([len(i) for i in ids], CONTINUATION_PAD_RATIO):
            totals = self._continuation_totals(
                [ids[row] for row in rows], [len(batch[row].prefill) for row in rows]
            )
            for row, total in zip(rows, totals, strict=True):
                results[row] = (total, len(ids[row]) - len(batch[row].prefill))
        return results

    def _continuation_totals(self, ids: list[list[int]], continuation_lengths: list[int]) -> list[float]:
        """The summed log-probability of the last ``continuation_lengths[i]`` tokens of each ``ids[i]``."""
        torch = self._torch
        inputs = self._pad(ids)
        # Left padding puts every continuation at the end: the logits of the last (longest + 1)
        # positions predict them all, so the vocabulary-wide logits of the prompts are never built.
        keep = max(continuation_lengths) + 1
        with torch.inference_mode():
            logits = self.model(**inputs, logits_to_keep=keep).logits[:, :-1].float()
            targets = inputs["input_ids"][:, -keep + 1 :]
            token_logprobs = logits.gather(-1, targets[..., None])[..., 0] - logits.logsumexp(-1)
        return [token_logprobs[i, -n:].sum().item() for i, n in enumerate(continuation_lengths)]

    def _line_break_ids(self) -> set[int]:
        """Ids of the tokens whose text holds a line break (computed once)."""
        if self._line_breaks is None:
            vocabulary = range(len(self.tokenizer))
            self._line_breaks = {i for i in vocabulary if "\n" in self.tokenizer.decode([i])}
        return self._line_breaks

    def _generate_batch(self, batch: list[_Request]) -> list[_Generated]:
        torch = self._torch
        _, max_tokens, temperature, top_p, one_line, lead = batch[0].key
        from transformers import LogitsProcessorList, StoppingCriteriaList

        inputs, lengths = self._encode(batch)
        width = inputs["input_ids"].shape[1]
        lead_width = 1 + len(lead.then) if lead else 0
        processors = LogitsProcessorList()
        if lead:
            forced = _ForcedLead(lead, width)
            processors.append(forced)
        if temperature > 0:
            generators = [torch.Generator(device=self.model.device).manual_seed(r.seed) for r in batch]
            processors.append(_SeededSampler(generators, temperature, top_p))
        criteria = StoppingCriteriaList(
            [_LineEnd(width + lead_width, self._line_break_ids(), self.model.device)] if one_line else []
        )
        self.batch_sizes.append(len(batch))
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                max_new_tokens=max_tokens + lead_width,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=sorted(self._eos_ids),
                do_sample=False,
                logits_processor=processors,
                stopping_criteria=criteria,
            )
        stops = self._eos_ids | self._line_break_ids() if one_line else self._eos_ids
        results = []
        for i, (row, length) in enumerate(
            zip(output[:, width + lead_width :].tolist(), lengths, strict=True)
        ):
            end = next((j + 1 for j, token in enumerate(row) if token in stops), len(row))
            text = self.tokenizer.decode(row[:end], skip_special_tokens=True)
            logprobs = forced.logprobs[i].tolist() if lead else None
            results.append(_Generated(text, row[:end], length, logprobs))
        return results
