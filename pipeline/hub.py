"""``sandbox push``: publish a transformed dataset and its card to the Hugging Face Hub.

``sandbox push DATASET --repo-id NAME [--private]`` uploads every config of a ``sandbox transform``
output with ``push_to_hub(config_name=...)`` (``mixed`` is the default config), then replaces the
card's text with :func:`pipeline.card.dataset_card`, keeping the YAML metadata the pushes generated
(``configs``, ``dataset_info``). The token comes from ``hf auth login`` or ``HF_TOKEN``; there is
deliberately no ``--token`` argument, so it never lands in shell history or logs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, load_dataset, load_from_disk
from huggingface_hub import DatasetCard, get_token
from huggingface_hub.errors import HfHubHTTPError

from pipeline.argparsing import parse
from pipeline.card import dataset_card
from pipeline.errors import UserError, run_command
from pipeline.groups import CONFIGS, SUMMARY_FILE

PROG = "sandbox push"


@dataclass
class PushConfig:
    """
    Parameters of ``sandbox push``.

    Parameters:
        dataset (`str`):
            The output folder of ``sandbox transform``.
        repo_id (`str`):
            The dataset repository, ``NAME`` (in the token owner's namespace) or ``ORG/NAME``.
        private (`bool`, *optional*, defaults to `False`):
            Whether a repository that does not exist yet is created private.
    """

    dataset: str = field(metadata={"help": "the output folder of `sandbox transform`", "positional": True})
    repo_id: str = field(metadata={"help": "dataset repository, NAME or ORG/NAME"})
    private: bool = field(default=False, metadata={"help": "create the repository private"})


def load_output(folder: str | Path) -> tuple[dict[str, Any], dict[str, Dataset]]:
    """The summary and the configs (name -> Dataset) of a ``sandbox transform`` output folder."""
    folder = Path(folder)
    try:
        summary = json.loads((folder / SUMMARY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{folder}: not a `sandbox transform` output (no readable {SUMMARY_FILE})") from None
    output_format = summary.get("output_format", "disk")
    configs = {}
    for name in CONFIGS:
        path = folder / name
        if not path.is_dir():
            raise UserError(f"{folder}: config folder {name}/ is missing")
        if output_format == "disk":
            configs[name] = load_from_disk(str(path))
        else:
            files = sorted(str(p) for p in path.glob(f"*.{output_format}"))
            configs[name] = load_dataset(output_format, data_files=files, split="train")
    return summary, configs


def push(folder: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Push every non-empty config of ``folder`` and its card to the dataset repo ``repo_id``."""
    summary, configs = load_output(folder)
    if get_token() is None:
        raise UserError("no Hugging Face token: run `hf auth login` or set HF_TOKEN")
    for name, dataset in configs.items():
        if len(dataset) == 0:
            print(f"skipping config {name}: no rows")
            continue
        info = dataset.push_to_hub(
            repo_id,
            config_name=name,
            set_default=name == "mixed",
            private=private,
            commit_message=f"Upload {name}",
        )
        repo_id = info.repo_url.repo_id  # a bare name resolves to the user's namespace
    pushed = DatasetCard.load(repo_id, repo_type="dataset")
    card = dataset_card(summary, card_data=pushed.data, repo_id=repo_id)
    card.push_to_hub(repo_id, repo_type="dataset", commit_message="Dataset card")
    return repo_id


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        config, _ = parse(
            PushConfig,
            argv,
            PROG,
            "Publish a `sandbox transform` output (every config) and its dataset card to the Hub. "
            "The token comes from `hf auth login` or HF_TOKEN.",
        )
        try:
            repo_id = push(config.dataset, config.repo_id, private=config.private)
        except HfHubHTTPError as err:  # the Hub's side (permissions, quota, outage), not bad input
            print(f"{PROG}: error: the Hub refused: {str(err).splitlines()[0]}", file=sys.stderr)
            return 1
        print(f"pushed {', '.join(CONFIGS)} and the card to datasets/{repo_id}")
        return 0

    return run_command(PROG, body)
