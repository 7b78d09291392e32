"""Arrow shards of interaction records, written so that a crash never loses or duplicates one.

Layout of one world's folder (``<output>/world-<world_id>/``)::

    manifest.jsonl                   one line per completed shard: round, agents, rows
    round-00003-part-0000.arrow      records, written with ``datasets``' ArrowWriter
    .round-00003-part-0001.arrow.tmp a shard being written (never read)
    complete.json                    the completion marker: rounds run, interactions, failed
    llm-cache.sqlite                 the world's response cache (``sandbox simulate``)

Everything a world needs is in its folder, so the folder can be run by any process (a rank is only
where a world runs) and a run resumed with another number of processes finds all of it.

A shard is written under a temporary name, flushed to disk and renamed (``textio.write_atomic``);
only then is its manifest line appended. The manifest lists the completed interactions; a restart removes temporary files,
adopts a renamed shard whose manifest line was lost to the crash, drops a torn last manifest line,
and carries on. ``datasets.load_dataset("arrow", data_files="<output>/world-*/*.arrow")`` reads
the finished shards of any number of worlds.

:meth:`WorldStore.rewind` forgets the rounds from a given one on (``--retry-failed``): the marker
goes first, then the shards, newest round first, then their manifest lines. A reader never sees
two versions of a record: the old ones are gone before a rerun writes new ones, and a crash part
way leaves only whole rounds, which a resume reruns.

A run keeps the record layout it was started with (``records.record_features``): a run folder
written before records carried ``schema_version`` is resumed in that layout, so its shards always
load together; reading such a shard gives each record ``schema_version`` 1.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from datasets import Dataset, Features
from datasets.arrow_writer import ArrowWriter

from pipeline.records import LEGACY_SCHEMA_VERSION, RECORD_FEATURES
from pipeline.textio import write_atomic

MANIFEST = "manifest.jsonl"
COMPLETE = "complete.json"
_SHARD = re.compile(r"round-(\d{5})-part-(\d{4})\.arrow")


def world_folder(output: Path, world_id: str) -> Path:
    return output / f"world-{world_id}"


def shard_name(round_: int, part: int) -> str:
    return f"round-{round_:05d}-part-{part:04d}.arrow"


def write_shard(path: Path, records: Sequence[dict[str, Any]], features: Features = RECORD_FEATURES) -> None:
    """Write ``records`` (their columns of ``features``) to ``path`` atomically."""
    buffer = io.BytesIO()
    writer = ArrowWriter(features=features, stream=pa.PythonFile(buffer, mode="w"))
    for record in records:
        writer.write(features.encode_example(record))
    writer.finalize(close_stream=False)
    write_atomic(path, buffer.getvalue())


def read_shard(path: Path) -> list[dict[str, Any]]:
    """The records of a shard, with every column of the current layout: those of a shard without
    ``schema_version`` read as version 1, columns added after a shard's version read as null."""
    rows = Dataset.from_file(str(path)).to_list()
    for row in rows:
        row.setdefault("schema_version", LEGACY_SCHEMA_VERSION)
        for name in RECORD_FEATURES.keys() - row.keys():
            row[name] = None
    return rows


@dataclass(frozen=True)
class ShardEntry:
    """One manifest line: a completed shard and the agents whose interactions it holds."""

    shard: str
    round: int
    agents: tuple[int, ...]

    def to_json(self) -> str:
        return json.dumps({"shard": self.shard, "round": self.round, "agents": list(self.agents)})


class WorldStore:
    """The records of one world: completed shards, what they cover, and new shards (in ``features``)."""

    def __init__(self, folder: Path, features: Features = RECORD_FEATURES) -> None:
        self.folder = folder
        self.features = features
        self.entries: list[ShardEntry] = []

    @property
    def manifest(self) -> Path:
        return self.folder / MANIFEST

    def open(self) -> None:
        """Create the folder or recover it after a crash (see the module docstring)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for tmp in self.folder.glob(".*.tmp"):
            tmp.unlink()
        self.entries = self._read_manifest()
        listed = {entry.shard for entry in self.entries}
        orphans = sorted(
            p
            for p in self.folder.glob("round-*-part-*.arrow")
            if p.name not in listed and _SHARD.fullmatch(p.name)
        )
        for path in orphans:
            rows = read_shard(path)
            self.entries.append(
                ShardEntry(path.name, int(_SHARD.fullmatch(path.name)[1]), tuple(r["agent_id"] for r in rows))
            )
        # Rewrite the manifest whole: drops a torn last line and records adopted shards.
        write_atomic(self.manifest, "".join(entry.to_json() + "\n" for entry in self.entries))

    def load(self) -> WorldStore:
        """Read the manifest without recovering anything (for reports on a finished run)."""
        self.entries = self._read_manifest()
        return self

    def _read_manifest(self) -> list[ShardEntry]:
        if not self.manifest.is_file():
            return []
        entries = []
        for line in self.manifest.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # the line being appended when the process died; its shard is adopted
            if (self.folder / row["shard"]).is_file():
                entries.append(ShardEntry(row["shard"], row["round"], tuple(row["agents"])))
        return entries

    def completed(self, round_: int) -> set[int]:
        """Agents whose interaction in ``round_`` is stored."""
        return {a for entry in self.entries if entry.round == round_ for a in entry.agents}

    def append(self, round_: int, records: Sequence[dict[str, Any]]) -> None:
        """Store the finished interactions ``records`` of ``round_`` as a new shard."""
        if not records:
            return
        part = sum(1 for entry in self.entries if entry.round == round_)
        while (self.folder / shard_name(round_, part)).exists():
            part += 1
        name = shard_name(round_, part)
        records = sorted(records, key=lambda r: r["agent_id"])
        write_shard(self.folder / name, records, self.features)
        entry = ShardEntry(name, round_, tuple(r["agent_id"] for r in records))
        with open(self.manifest, "a") as file:
            file.write(entry.to_json() + "\n")
            file.flush()
            os.fsync(file.fileno())
        self.entries.append(entry)

    @property
    def marker(self) -> Path:
        return self.folder / COMPLETE

    def completion(self) -> dict[str, int] | None:
        """The completion marker (``rounds``, ``interactions``, ``failed``), or ``None``."""
        return read_completion(self.folder)

    def mark_complete(self, rounds: int) -> dict[str, int]:
        """Record that the world's first ``rounds`` rounds are all stored (and how many failed)."""
        rows = self.records()
        marker = {
            "rounds": rounds,
            "interactions": len(rows),
            "failed": sum(row["status"] != "ok" for row in rows),
        }
        write_atomic(self.marker, json.dumps(marker) + "\n")
        return marker

    def first_failed_round(self) -> int | None:
        """The first round holding a failed interaction, or ``None``."""
        marker = self.completion()
        if marker is not None and marker["failed"] == 0:
            return None
        failed = [row["round"] for row in self.records() if row["status"] != "ok"]
        return min(failed, default=None)

    def rewind(self, round_: int) -> None:
        """Forget rounds ``round_`` and later (see the module docstring for the order)."""
        self.marker.unlink(missing_ok=True)
        dropped = sorted((e for e in self.entries if e.round >= round_), key=lambda e: e.round, reverse=True)
        for entry in dropped:
            (self.folder / entry.shard).unlink(missing_ok=True)
        self.entries = [entry for entry in self.entries if entry.round < round_]
        write_atomic(self.manifest, "".join(entry.to_json() + "\n" for entry in self.entries))

    def records(self, rounds: Iterable[int] | None = None) -> list[dict[str, Any]]:
        """Stored records (of ``rounds``, or all), sorted by round then agent."""
        wanted = None if rounds is None else set(rounds)
        rows = [
            row
            for entry in self.entries
            if wanted is None or entry.round in wanted
            for row in read_shard(self.folder / entry.shard)
        ]
        return sorted(rows, key=lambda r: (r["round"], r["agent_id"]))


def read_completion(folder: Path) -> dict[str, int] | None:
    """A world folder's completion marker, or ``None`` when the world is not complete."""
    try:
        return json.loads((folder / COMPLETE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def world_complete(folder: Path, rounds: int) -> bool:
    """Whether the world in ``folder`` has run at least ``rounds`` rounds."""
    marker = read_completion(folder)
    return marker is not None and marker["rounds"] >= rounds


def run_records(output: Path) -> list[dict[str, Any]]:
    """Every stored record of a run folder, sorted by world, round and agent."""
    rows = []
    for folder in sorted(output.glob("world-*")):
        rows += WorldStore(folder).load().records()
    return sorted(rows, key=lambda r: (r["world_id"], r["round"], r["agent_id"]))
