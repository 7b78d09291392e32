"""Per-round summaries of a sandbox run: ``summary.json``, a text table and ``rounds.png``.

Both files are a pure function of the run folder's shards (:func:`write_summary`), so a run
resumed, extended or run by several processes gets the same summary as one run in one go. The
rank that finishes a run's last world writes them; :func:`merge_run` (``sandbox simulate --merge
RUN``) recomputes them at any time, from whatever the worlds hold so far.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.llm.ratings import SCALE
from pipeline.quality import TEXT_KINDS, flag_counts, stored_flags
from pipeline.records import ASPECTS, SCORE_FIELDS, WHEN
from pipeline.shards import run_records
from pipeline.textio import format_table, write_atomic

SUMMARY_FILE = "summary.json"
PLOT_FILE = "rounds.png"


def _mean(values: Iterable[float | None]) -> float | None:
    read = [v for v in values if v is not None]
    return sum(read) / len(read) if read else None


def _flagged(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Texts flagged per kind of text (``flagged_draft``, ...) and per reason code (``flags``) in
    ``rows``' stored quality flags (computed for records stored without them)."""
    counts = flag_counts(stored_flags(row) for row in rows)
    reasons: dict[str, int] = defaultdict(int)
    for kind in TEXT_KINDS:
        for code, count in counts[kind].items():
            if code not in ("texts", "flagged"):
                reasons[code] += count
    return {
        **{f"flagged_{kind}": counts[kind].get("flagged", 0) for kind in TEXT_KINDS},
        "flags": dict(sorted(reasons.items())),
    }


def round_summary(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (world, round): interactions, failures, mean observer scores (nulls skipped) and
    the texts with quality flags (per kind of text, and per reason code over all texts)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[record["world_id"], record["round"]].append(record)
    return [
        {
            "world_id": world_id,
            "round": round_,
            "interactions": len(rows),
            "failed": sum(r["status"] != "ok" for r in rows),
            **{name: _mean(r["scores"][name] for r in rows) for name in SCORE_FIELDS},
            **_flagged(rows),
        }
        for (world_id, round_), rows in sorted(groups.items())
    ]


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """The per-round summary as an aligned text table."""
    header = (
        "world",
        "round",
        "n",
        "failed",
        *(name.replace("_", " ") for name in SCORE_FIELDS),
        *(f"flagged {kind}s" for kind in TEXT_KINDS),
    )
    body = [
        (
            row["world_id"],
            row["round"],
            row["interactions"],
            row["failed"],
            *(None if row[name] is None else f"{row[name]:.2f}" for name in SCORE_FIELDS),
            *(row.get(f"flagged_{kind}") for kind in TEXT_KINDS),
        )
        for row in rows
    ]
    return format_table(header, body)


def plot_round_curves(draw: Callable[[Any, str], None]) -> bytes:
    """A PNG with one panel per aspect over the rounds, on the 1..SCALE scale; ``draw(ax, aspect)``
    draws a panel's lines (a curve's label goes into the last panel's legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, grid = plt.subplots(1, len(ASPECTS), figsize=(5 * len(ASPECTS), 4), sharex=True, squeeze=False)
    axes = grid[0]
    for ax, aspect in zip(axes, ASPECTS, strict=True):
        draw(ax, aspect)
        ax.set_title(f"observer {aspect}")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(1, SCALE)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"mean rating (1-{SCALE})")
    axes[-1].legend(fontsize="small")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return png.getvalue()


def plot_rounds(rows: Sequence[dict[str, Any]]) -> bytes:
    """A PNG of mean observer scores per round and world, before and after revision."""
    worlds = sorted({row["world_id"] for row in rows})

    def draw(ax: Any, aspect: str) -> None:
        for index, world_id in enumerate(worlds):
            mine = [row for row in rows if row["world_id"] == world_id]
            rounds = [row["round"] for row in mine]
            for when, style in zip(WHEN, ("--", "-"), strict=True):
                values = [
                    float("nan") if row[f"{aspect}_{when}"] is None else row[f"{aspect}_{when}"]
                    for row in mine
                ]
                ax.plot(rounds, values, style, color=f"C{index}", marker="o", label=f"{world_id} {when}")

    return plot_round_curves(draw)


def write_summary(output: Path) -> list[dict[str, Any]]:
    """Recompute ``summary.json`` and ``rounds.png`` of a run folder from all its worlds' shards.

    Both are written atomically; returns the summary's rows.
    """
    rows = round_summary(run_records(output))
    write_atomic(output / SUMMARY_FILE, json.dumps(rows, indent=1))
    write_atomic(output / PLOT_FILE, plot_rounds(rows))
    return rows


def merge_run(output: Path) -> list[dict[str, Any]]:
    """:func:`write_summary` for a run folder given by a user: a :class:`UserError` if it holds no worlds."""
    if not output.is_dir() or not any(output.glob("world-*/manifest.jsonl")):
        raise UserError(f"{output} holds no sandbox worlds (no world-*/manifest.jsonl)")
    return write_summary(output)
