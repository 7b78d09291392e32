"""The sandbox world: a square grid of agents, their neighbourhoods, stances and seeded randomness.

Every random choice of the simulation (which agents start good or bad, which prior pairs seed a
memory, which question an agent gets, who its partners are) is drawn from a generator derived
from ``(seed, world_id, purpose, *key)``. No generator is shared between agents or rounds, so the
order in which concurrent interactions finish can never change a result.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, get_args

import numpy as np

Stance = Literal["all_good", "all_bad", "half_half", "mixed_half_half"]
"""How agents' memories are seeded: everyone good, everyone bad, the top half of the grid good and
the rest bad, or a random half good (drawn from the world's seed)."""
STANCES: tuple[str, ...] = get_args(Stance)

GOOD, BAD = "good", "bad"


def _key_int(part: int | str) -> int:
    """Map a key part to a non-negative integer; strings go through a stable hash (not ``hash()``)."""
    if isinstance(part, int):
        if part < 0:
            raise ValueError(f"random key parts must be non-negative, got {part}")
        return part
    return int.from_bytes(hashlib.blake2b(part.encode(), digest_size=8).digest(), "big")


def derived_rng(seed: int, *key: int | str) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``key``: one per purpose, world, round, agent."""
    return np.random.default_rng(np.random.SeedSequence([_key_int(seed), *map(_key_int, key)]))


@dataclass(frozen=True)
class World:
    """One society: ``size x size`` agents, agent id ``row * size + col``.

    ``radius``: neighbours are the agents within this Euclidean distance on the grid.
    ``global_interaction``: each of an interaction's partner slots is, with probability
    ``dropout``, given to a random agent outside the neighbourhood instead of a neighbour
    (the paper's "social media" setting).
    """

    world_id: str
    size: int
    stance: Stance
    seed: int
    radius: float
    global_interaction: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.size < 2:
            raise ValueError(f"world size must be at least 2, got {self.size}")
        if self.stance not in STANCES:
            raise ValueError(f"unknown stance {self.stance!r}; choose from {', '.join(STANCES)}")
        if self.radius < 1:
            raise ValueError(f"radius must be at least 1 (the adjacent agents), got {self.radius}")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"dropout must be between 0 and 1, got {self.dropout}")

    @property
    def num_agents(self) -> int:
        return self.size * self.size

    def position(self, agent_id: int) -> tuple[int, int]:
        """``(row, col)`` of an agent."""
        return divmod(agent_id, self.size)

    def rng(self, purpose: str, *key: int | str) -> np.random.Generator:
        """The generator for one purpose in this world (e.g. ``rng("question", round, agent)``)."""
        return derived_rng(self.seed, self.world_id, purpose, *key)

    @cached_property
    def neighbourhoods(self) -> tuple[tuple[int, ...], ...]:
        """For each agent, the other agents within ``radius``, in id order."""
        rows, cols = np.divmod(np.arange(self.num_agents), self.size)
        dist = np.hypot(rows[:, None] - rows[None, :], cols[:, None] - cols[None, :])
        # A small tolerance so that radius 5 includes (3, 4) exactly on the circle.
        near = (dist <= self.radius + 1e-9) & ~np.eye(self.num_agents, dtype=bool)
        return tuple(tuple(np.flatnonzero(row).tolist()) for row in near)

    @property
    def min_neighbourhood(self) -> int:
        """The smallest neighbourhood (a corner agent's): the largest ``k`` the world allows."""
        return min(map(len, self.neighbourhoods))

    @cached_property
    def labels(self) -> tuple[str, ...]:
        """Each agent's initial stance label, ``good`` or ``bad``."""
        n = self.num_agents
        n_good = math.ceil(n / 2)
        if self.stance == "all_good":
            return (GOOD,) * n
        if self.stance == "all_bad":
            return (BAD,) * n
        if self.stance == "half_half":
            # Agent ids run row by row, so the first ids form a contiguous block of rows.
            return tuple(GOOD if a < n_good else BAD for a in range(n))
        good = set(self.rng("stances").permutation(n)[:n_good].tolist())
        return tuple(GOOD if a in good else BAD for a in range(n))

    def partners(self, agent_id: int, round_: int, k: int) -> list[int]:
        """The ``k`` agents that rate ``agent_id``'s draft in ``round_``, sorted by id."""
        local = self.neighbourhoods[agent_id]
        if k > len(local):
            raise ValueError(f"k={k} exceeds agent {agent_id}'s {len(local)} neighbours")
        rng = self.rng("partners", round_, agent_id)
        n_far = int(rng.binomial(k, self.dropout)) if self.global_interaction else 0
        if n_far:
            local_set = set(local)
            far = [a for a in range(self.num_agents) if a != agent_id and a not in local_set]
            n_far = min(n_far, len(far))
            chosen = rng.choice(far, size=n_far, replace=False).tolist() if n_far else []
        else:
            chosen = []
        chosen += rng.choice(local, size=k - n_far, replace=False).tolist()
        return sorted(chosen)

    def question_group(self, round_: int, agent_id: int, per_question: int = 1) -> tuple[int, ...]:
        """The agents answering the same question as ``agent_id`` in ``round_`` (sorted ids).

        With ``per_question`` 1 (the paper), every agent answers its own question. Otherwise the
        round's agents are shuffled (from the world's seed and the round) and cut into groups of
        ``per_question`` (the last one smaller when the agents do not divide evenly).
        """
        if per_question <= 1:
            return (agent_id,)
        order = self.rng("question-groups", round_).permutation(self.num_agents).tolist()
        start = order.index(agent_id) // per_question * per_question
        return tuple(sorted(order[start : start + per_question]))

    def question_index(self, round_: int, agent_id: int, pool_size: int, per_question: int = 1) -> int:
        """Which question of the pool ``agent_id`` answers in ``round_``: the question drawn for
        the lowest id of its :meth:`question_group` (its own, with one agent per question)."""
        leader = self.question_group(round_, agent_id, per_question)[0]
        return int(self.rng("question", round_, leader).integers(pool_size))

    def sample_index(self, round_: int, agent_id: int, call: str) -> int:
        """The ``sample_index`` of one model call of ``agent_id``'s interaction in ``round_``:
        derived from the world's seed, the world, the round, the agent and the call (``draft``,
        ``revision``, ``rating-<partner>``), so every sampled answer has its own seed."""
        return int(self.rng("sample", round_, agent_id, call).integers(2**63))
