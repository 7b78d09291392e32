"""``sandbox show RUN``: a run's interactions as a person reads them, with their quality flags.

Each interaction prints the question, the draft, every neighbour's rating and reason, the
revision and the observers' scores before and after, each text marked when it was trimmed to its
last complete sentence and followed by its quality flags
(``pipeline.quality``): the flags stored with the record, or computed now for records written
without them. A table of flag counts over the whole run closes the output.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.argparsing import parse
from pipeline.errors import UserError, run_command
from pipeline.quality import (
    REASONS,
    TEXT_KINDS,
    QualityConfig,
    Reason,
    RecordFlags,
    flag_counts,
    stored_flags,
)
from pipeline.records import ASPECTS
from pipeline.shards import WorldStore
from pipeline.textio import format_table

PROG = "sandbox show"


@dataclass
class ShowConfig:
    """What ``sandbox show`` prints.

    Selection:
        run, n, flag
    Flags computed for records stored without them:
        quality
    """

    run: str = field(metadata={"help": "the output folder of `sandbox simulate`", "positional": True})
    n: int | None = field(
        default=10, metadata={"help": "print at most this many interactions (none: all of them)"}
    )
    flag: Reason | None = field(
        default=None,
        metadata={"help": f"only interactions with this flag on any text; one of {', '.join(REASONS)}"},
    )
    quality: QualityConfig = field(
        default_factory=QualityConfig,
        metadata={"help": "thresholds of the quality rules, for records stored without flags"},
    )

    def __post_init__(self) -> None:
        if self.n is not None and self.n < 0:
            raise UserError("--n must be >= 0")
        if self.flag is not None and self.flag not in REASONS:
            raise UserError(f"unknown flag {self.flag!r}; choose one of {', '.join(REASONS)}")


def read_run(run: str | Path) -> list[dict[str, Any]]:
    """Every stored record of a run folder, world by world, each sorted by round then agent."""
    folder = Path(run)
    worlds = sorted(p for p in folder.glob("world-*") if p.is_dir())
    if not worlds:
        raise UserError(f"{folder}: no world-* folders; expected the output folder of `sandbox simulate`")
    return [record for world in worlds for record in WorldStore(world).load().records()]


def _flags(codes: Sequence[str]) -> str:
    return f"  [{', '.join(codes)}]" if codes else ""


def _block(text: str | None) -> str:
    return textwrap.indent(text.strip() if text else "(none)", "    ")


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_interaction(record: Mapping[str, Any], flags: RecordFlags) -> str:
    """One interaction as text: question, draft, neighbours, revision, scores, flags."""
    head = (
        f"=== world {record.get('world_id')}  round {record.get('round')}  agent {record.get('agent_id')}"
        f" ({record.get('stance')})  {record.get('status')} ==="
    )
    trimmed = record.get("trimmed") or {}

    def label(name: str) -> str:
        cut = " (trimmed to its last sentence)" if trimmed.get(name) else ""
        return f"{name.title()}{cut}:{_flags(flags[name])}"

    lines = [head, "Question:", _block(record.get("question")), label("draft")]
    lines.append(_block(record.get("draft")))
    lines.append("Neighbours:")
    feedback = record.get("feedback") or []
    cuts = trimmed.get("feedback") or [False] * len(feedback)
    for item, codes, cut in zip(feedback, flags["feedback"], cuts, strict=True):
        rating = "no rating" if item.get("rating") is None else f"rated {item['rating']:.3g}"
        trim = " (trimmed to its last sentence)" if cut else ""
        lines.append(f"  agent {item.get('agent_id')}, {rating}{trim}:{_flags(codes)}")
        lines.append(_block(item.get("reason")))
    lines += [label("revision"), _block(record.get("revision"))]
    scores = record.get("scores") or {}
    lines.append(
        "Observers: "
        + ", ".join(
            f"{aspect} {_score(scores.get(f'{aspect}_before'))} -> {_score(scores.get(f'{aspect}_after'))}"
            for aspect in ASPECTS
        )
    )
    if record.get("error"):
        lines.append(f"Error: {record['error']}")
    return "\n".join(lines)


def _has(flags: RecordFlags, code: str) -> bool:
    return code in flags["draft"] or code in flags["revision"] or any(code in f for f in flags["feedback"])


def count_table(all_flags: Sequence[RecordFlags]) -> str:
    """Texts and flagged texts per kind of text, then one column per reason code that occurs."""
    counts = flag_counts(all_flags)
    codes = [code for code in REASONS if any(code in counts[kind] for kind in TEXT_KINDS)]
    rows = [
        [kind, counts[kind].get("texts", 0), counts[kind].get("flagged", 0)]
        + [counts[kind].get(code, 0) for code in codes]
        for kind in TEXT_KINDS
    ]
    return format_table(["text", "texts", "flagged", *codes], rows)


def show(config: ShowConfig) -> str:
    """The text ``sandbox show`` prints for ``config``."""
    records = read_run(config.run)
    all_flags = [stored_flags(record, config.quality) for record in records]
    chosen = [
        (record, flags)
        for record, flags in zip(records, all_flags, strict=True)
        if config.flag is None or _has(flags, config.flag)
    ]
    shown = chosen if config.n is None else chosen[: config.n]
    which = f" with flag {config.flag}" if config.flag else ""
    parts = [format_interaction(record, flags) for record, flags in shown]
    parts.append(f"{len(shown)} of {len(chosen)} interactions{which} shown ({len(records)} in the run).")
    parts.append(count_table(all_flags))
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> None:
        config, _ = parse(ShowConfig, argv, PROG, __doc__.splitlines()[0])
        print(show(config))

    return run_command(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
