"""Per-round summaries of a sandbox run: a text table and a PNG of observer scores."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.records import SCORE_FIELDS


def _mean(values: Iterable[float | None]) -> float | None:
    read = [v for v in values if v is not None]
    return sum(read) / len(read) if read else None


def round_summary(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (world, round): interactions, failures and mean observer scores (nulls skipped)."""
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
        }
        for (world_id, round_), rows in sorted(groups.items())
    ]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The summary as an aligned text table."""
    header = ("world", "round", "n", "failed", "align before", "align after", "engage before", "engage after")
    body = [
        (
            row["world_id"],
            str(row["round"]),
            str(row["interactions"]),
            str(row["failed"]),
            *("-" if row[name] is None else f"{row[name]:.2f}" for name in SCORE_FIELDS),
        )
        for row in rows
    ]
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.rjust(w) for cell, w in zip(cells, widths, strict=True)) for cells in [header, *body]
    )


def plot_rounds(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Mean observer alignment and engagement, before and after revision, per round and world."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    worlds = sorted({row["world_id"] for row in rows})
    for ax, aspect in zip(axes, ("alignment", "engagement"), strict=True):
        for index, world_id in enumerate(worlds):
            mine = [row for row in rows if row["world_id"] == world_id]
            rounds = [row["round"] for row in mine]
            color = f"C{index}"
            for when, style in (("before", "--"), ("after", "-")):
                values = [
                    float("nan") if row[f"{aspect}_{when}"] is None else row[f"{aspect}_{when}"]
                    for row in mine
                ]
                ax.plot(rounds, values, style, color=color, marker="o", label=f"{world_id} {when}")
        ax.set_title(f"observer {aspect}")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(1, 7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean rating (1-7)")
    axes[1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
