"""The dataset card of a transformed dataset: what the data is, provenance, schema, statistics.

Written next to the configs by ``sandbox transform`` and pushed by ``sandbox push``, which keeps the
YAML metadata ``push_to_hub`` generated and adds ours.
"""

from __future__ import annotations

import json
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData

from pipeline.groups import CONFIGS, KINDS, SKIP_REASONS
from pipeline.textio import format_table

LICENSE = "apache-2.0"
"""Licence of the published data; the agent and observer models' terms of use may add conditions."""

PAPER = "https://arxiv.org/abs/2305.16960"
CITATION = """@article{liu2023training,
  title   = {Training Socially Aligned Language Models on Simulated Social Interactions},
  author  = {Liu, Ruibo and Yang, Ruixin and Jia, Chenyan and Zhang, Ge and Zhou, Denny and
             Dai, Andrew M. and Yang, Diyi and Vosoughi, Soroush},
  journal = {arXiv preprint arXiv:2305.16960},
  year    = {2023}
}"""

_DESCRIPTIONS = {
    "imitation": "prompt = the question; completions = the draft and the revision, scored by the "
    "observer's alignment rating before and after revision.",
    "self_critic": "prompt = question + draft + an instruction to judge its alignment with shared social "
    "values; completions = the neighbours' reasons, scored by their ratings.",
    "realignment": "prompt = question + draft + an instruction to comment and revise; completion = the "
    "neighbours' feedback, a separator and the revision, scored by the alignment after revision; kept only "
    "where the observer's alignment rose and ends above the scale's midpoint.",
    "mixed": "the three kinds sampled to the ratio below with a fixed seed, shuffled.",
}


def _size_category(rows: int) -> str:
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if rows < limit:
            return name
    return "1M<n<10M"


def _how_to_load(summary: dict[str, Any], repo_id: str | None) -> str:
    if repo_id:
        return (
            "```python\nfrom datasets import load_dataset\n\n"
            f'groups = load_dataset("{repo_id}", "mixed", split="train")  # or imitation, self_critic, realignment\n```'
        )
    if summary.get("output_format", "disk") == "disk":
        return (
            "```python\nfrom datasets import load_from_disk\n\n"
            'groups = load_from_disk("path/to/this/folder/mixed")  # or imitation, self_critic, realignment\n```'
        )
    return (
        "```python\nfrom datasets import load_dataset\n\n"
        'groups = load_dataset("path/to/this/folder", "mixed", split="train")\n```'
    )


def _quality_section(quality: dict[str, Any]) -> str:
    """Texts flagged per reason and kind of text, what the flags dropped, and the thresholds."""
    texts = quality["texts"]
    codes = sorted({code for counts in texts.values() for code in counts} - {"texts", "flagged"})
    policy = (
        "Flagged texts were **kept** (`--keep-flagged`)."
        if quality["keep_flagged"]
        else "Flagged texts were dropped: a flagged draft or revision drops that imitation completion and "
        "the record's realignment example; a flagged reason drops that self-critic completion and is left "
        "out of the realignment feedback (counted as `skipped: flagged` above)."
    )
    return (
        "## Data-quality filters\n\n"
        "Every draft, revision and neighbour's reason was checked by rules for degenerate text "
        "(`pipeline.quality`): `empty`, `too_short`, `truncated` (cut mid-sentence), `copied_prompt` "
        "(instruction, system or worked-example text), `format_leak`, `copied_draft`, `copied_feedback` (a revision pasting "
        "a sentence of a neighbour's reason), `misquoted` (a reason "
        "quoting words the rated answer does not hold), `author_voice` (a reason promising to act, \"I'll do "
        'better.", instead of judging), `stated_rating` (a reason restating a score, "The answer is 4 out of 7."), '
        '`ai_persona` (a text speaking as or to an AI, "As a community-focused AI, ..."), `repetition` '
        "(Gopher-style n-gram and duplicate-sentence rules adapted to short texts), `off_topic` (no "
        "content word shared with the question and few dictionary words), `meta_commentary` (an answer "
        "that talks about the answer or the members instead of answering), `same_as_draft` and "
        f"`duplicate_reason`. {policy} Flags stored with the records: {quality['flags_stored']}; "
        f"computed at transform: {quality['flags_computed']}.\n\n"
        + format_table(
            ("text", "texts", "flagged", *codes),
            [
                (kind, counts.get("texts", 0), counts.get("flagged", 0), *(counts.get(c, 0) for c in codes))
                for kind, counts in texts.items()
            ],
            markdown=True,
        )
        + f"\n\nThresholds:\n\n```json\n{json.dumps(quality['thresholds'], indent=2)}\n```"
    )


def _measured(figures: dict[str, Any] | None) -> str:
    if not figures:
        return "not measured"
    return (
        f"{figures['auc']:.3f} ({figures['wins']:g}/{figures['pairs']} pairs, gap {figures['gap_sd']:+.2f} SD; "
        f"prompts {figures['prompts']})"
    )


def _judge_section(run_configs: dict[str, Any]) -> str:
    """Per run: how its observers scored (``pipeline.judge``) and how well that separates labelled
    good from bad answers."""
    rows = []
    for name, saved in run_configs.items():
        judge = saved.get("judge") if isinstance(saved, dict) else None
        if judge is None:  # runs made before the judge was recorded: prompted ratings with reasons
            rows.append(
                (name, "-", "prompted (digit expectation)", "not measured", "prompted", "not measured")
            )
            continue
        alignment = (
            "contrast (calibrated log-probabilities)"
            if judge["alignment"] == "contrast"
            else "prompted (digit expectation)"
        )
        rows.append(
            (
                name,
                judge["observer"],
                alignment,
                _measured(judge["test"].get("alignment")),
                "prompted (digit expectation)",
                _measured(judge["test"].get("engagement")),
            )
        )
    if not rows:
        return "## Judge\n\nNo run configuration was found: the observers' judge is not recorded."
    return (
        "## Judge\n\nThe scores are the memoryless observers' (`pipeline.judge`). Their separability was "
        "measured on the labelled test half of `pipeline/data/judge_pairs.jsonl` (good and bad answers of "
        "similar length to questions outside the prompts; `benchmarks/bench_observer.py`): the AUC is the "
        "chance that a good answer outscores a bad one (0.5 is chance), with the pairs ranked right and the "
        "mean paired gap in standard deviations of the scores. Measured per observer model; other observers: "
        "not measured.\n\n"
        + format_table(
            (
                "run",
                "observer",
                "alignment score",
                "alignment AUC (test)",
                "engagement score",
                "engagement AUC (test)",
            ),
            rows,
            markdown=True,
        )
    )


def card_text(summary: dict[str, Any], repo_id: str | None = None) -> str:
    """The markdown body of the card: what the data is, provenance, schema, statistics, loading."""
    configs = summary["configs"]
    kinds = summary["kinds"]
    style = summary.get("style", "text")
    constants = summary.get("constants", {})
    text_type = "string" if style == "text" else 'list of {"role", "content"} messages'
    sections = [
        "# Stable Alignment comparison groups",
        "Alignment data recorded in a simulated society of language-model agents (the SANDBOX of "
        f"[Stable Alignment]({PAPER}), Liu et al. 2023). Agents answer questions, neighbours rate and "
        "critique each answer, the author revises it, and memoryless observers score the draft and the "
        "revision for alignment with shared social values on a 1-7 scale. Each row is a **comparison "
        "group**: one prompt, several completions and one score per completion, ready for the Stable "
        "Alignment loss; `pipeline.convert.groups_to_pairs` turns it into TRL's pairwise preference format.",
        "## Configs\n\n" + "\n".join(f"- `{name}`: {_DESCRIPTIONS[name]}" for name in CONFIGS),
        "Scores are never invented: interactions that failed and completions whose rating could not be "
        "read (null), was NaN or fell off the 1-7 scale were skipped and are counted below. Identical "
        "completions within a group were merged (mean score); groups with a single completion are kept "
        "and flagged `sft_only` (the loss reduces to supervised fine-tuning on them).",
        "## Provenance\n\n"
        + format_table(
            ("", "value"),
            [
                ("interaction records", summary["records"]),
                ("failed records (skipped)", summary["failed_records"]),
                ("runs", ", ".join(summary.get("run_ids", [])) or "-"),
                ("worlds", ", ".join(summary.get("world_ids", [])) or "-"),
                ("agent models", ", ".join(summary.get("agent_models", [])) or "-"),
                ("observer models", ", ".join(summary.get("observer_models", [])) or "-"),
            ],
            markdown=True,
        ),
    ]
    for name, config in summary.get("run_configs", {}).items():
        sections.append(f"World configuration `{name}`:\n\n```json\n{json.dumps(config, indent=2)}\n```")
    if constants:
        sections.append(
            "Prompt construction (self-critic and realignment): "
            f"`{json.dumps(constants['prompt_template'])}` with instruction "
            f"`{json.dumps(constants['self_critic_instruction'])}` (self-critic) or "
            f"`{json.dumps(constants['realignment_instruction'])}` (realignment); realignment completions "
            f"join feedback and revision with `{json.dumps(constants['realignment_separator'])}`."
        )
    sections.append(
        "## Schema\n\n"
        + format_table(
            ("column", "type", "meaning"),
            [
                ("prompt", text_type, "the prompt shared by the group"),
                ("completions", f"list of {text_type}", "the responses, best first"),
                ("scores", "list of float32", "score of each completion, 1 (worst) to 7 (best)"),
                ("kind", "string", "imitation, self_critic or realignment"),
                ("sft_only", "bool", "fewer than two completions: usable for SFT only"),
                ("num_sources", "int32", "number of interaction records merged into the group"),
                ("run_ids", "list of string", "the simulation runs the group came from"),
            ],
            markdown=True,
        )
    )
    sections.append(
        "## Statistics\n\n"
        + format_table(
            ("config", "rows", "sft-only rows", "mean completions per group", "mean score"),
            [
                (name, s["rows"], s["sft_only"], s["mean_completions"], s["mean_score"])
                for name, s in configs.items()
            ],
            markdown=True,
        )
        + "\n\nScore histogram (completions per rounded score):\n\n"
        + format_table(
            ("config", *configs[CONFIGS[0]]["score_histogram"]),
            [(name, *s["score_histogram"].values()) for name, s in configs.items()],
            markdown=True,
        )
        + f"\n\nMixing ratio {':'.join(format(summary['ratio'][k], 'g') for k in KINDS)} "
        f"(imitation : self-critic : realignment, in groups), seed {summary['seed']}.\n\n"
        + format_table(
            (
                "kind",
                "groups available",
                "kept in mixed",
                *(f"skipped: {r}" for r in SKIP_REASONS),
                "duplicates merged",
            ),
            [
                (
                    k,
                    v["available"],
                    v["kept_in_mixed"],
                    *(v["skipped"][r] for r in SKIP_REASONS),
                    v["duplicates_merged"],
                )
                for k, v in kinds.items()
            ],
            markdown=True,
        )
    )
    sections.append(_judge_section(summary.get("run_configs", {})))
    if "quality" in summary:
        sections.append(_quality_section(summary["quality"]))
    sections.append("## How to load\n\n" + _how_to_load(summary, repo_id))
    sections.append(
        f"## Licence\n\n{LICENSE.title()}. The texts were generated by the models listed above; "
        "their providers' terms of use may also apply."
    )
    sections.append(f"## Citation\n\n```bibtex\n{CITATION}\n```")
    return "\n\n".join(sections) + "\n"


def dataset_card(
    summary: dict[str, Any], *, card_data: DatasetCardData | None = None, repo_id: str | None = None
) -> DatasetCard:
    """The card of a transformed dataset.

    ``card_data`` is the metadata already on the Hub (what ``push_to_hub`` generated); its fields
    are kept and ours added. Without it, a local card is made whose ``configs`` point at the
    Parquet/Arrow files so ``load_dataset(folder, config)`` works.
    """
    data = card_data or DatasetCardData()
    data.license = LICENSE
    data.pretty_name = data.pretty_name or "Stable Alignment comparison groups"
    data.task_categories = ["text-generation"]
    data.tags = sorted(
        {*(getattr(data, "tags", None) or []), "stable-alignment", "alignment", "synthetic", "preference"}
    )
    data.size_categories = [_size_category(summary["configs"]["mixed"]["rows"])]
    output_format = summary.get("output_format", "disk")
    if card_data is None and output_format != "disk":
        data.configs = [
            {
                "config_name": name,
                "data_files": [{"split": "train", "path": f"{name}/*.{output_format}"}],
                **({"default": True} if name == "mixed" else {}),
            }
            for name in CONFIGS
        ]
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{card_text(summary, repo_id)}")
