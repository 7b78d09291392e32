"""Agent memory: the (question, answer) pairs an agent has said, searched with BM25.

An agent's memory is seeded from prior pairs matching its stance and grows by one pair (the
question and its final, revised answer) per interaction. It is never stored on its own: a resumed
run rebuilds it from the prior sample and the interaction records.

Retrieval uses ``rank_bm25.BM25Plus`` rather than ``BM25Okapi``: Okapi's idf,
``log((N - n + 0.5) / (n + 0.5))``, is zero or negative for a term found in half or more of the
documents, which in a memory of two or three pairs is nearly every term, so the pair that shares
the query's words can rank *below* one that does not. BM25Plus's idf, ``log((N + 1) / n)``, is
never negative, and its lower bound ``delta`` keeps long pairs from being pushed under short ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from rank_bm25 import BM25Plus

# Words that carry no topic. In a memory of a few dozen pairs their idf is not low enough to
# stop "you" or "the" from deciding the ranking, so they are removed up front.
_STOPWORD_TEXT = """
a an and are as at be but by can do does for from how i if in is it its me my of on or should so
that the their them there they this to was we what when where which who why will with would you your
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-cased words, stop words removed."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


@dataclass(frozen=True)
class MemoryEntry:
    """One thing the agent said: a question and its answer."""

    question: str
    answer: str


class AgentMemory:
    """An agent's (question, answer) pairs in the order they were added."""

    def __init__(self, entries: Iterable[MemoryEntry] = ()) -> None:
        self._entries: list[MemoryEntry] = list(entries)
        self._index: BM25Plus | None = None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> tuple[MemoryEntry, ...]:
        return tuple(self._entries)

    def add(self, question: str, answer: str) -> None:
        self._entries.append(MemoryEntry(question, answer))
        self._index = None  # rebuilt on the next retrieval, once per round in practice

    def retrieve(self, query: str, top_n: int) -> list[MemoryEntry]:
        """The ``top_n`` pairs whose questions best match ``query``, best first.

        Ties (including a query sharing no word with any question) go to the most recent pair,
        so an agent always recalls something of its own stance while it has any memory.
        An empty memory, or ``top_n == 0``, gives no context.
        """
        if not self._entries or top_n <= 0:
            return []
        terms = tokenize(query)
        if terms:
            if self._index is None:
                # BM25Plus divides by the mean document length: an all-stop-word question must
                # still count as one (empty) token-free document, hence the placeholder.
                self._index = BM25Plus([tokenize(e.question) or ["\0"] for e in self._entries])
            scores = self._index.get_scores(terms).tolist()
        else:
            scores = [0.0] * len(self._entries)
        order = sorted(range(len(self._entries)), key=lambda i: (-scores[i], -i))
        return [self._entries[i] for i in order[:top_n]]
