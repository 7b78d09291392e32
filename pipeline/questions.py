"""Question pools and prior (question, answer, label) pairs.

A pool is a text file with one question per line, a JSON Lines / JSON / CSV file with a question
column, a ``save_to_disk`` folder, or any dataset ``datasets.load_dataset`` can open (a Hub name
or a local data folder), with a column and a split. The package ships a default pool of everyday social and ethical questions and a
small default prior of good and bad answers for seeding memories.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.errors import UserError
from pipeline.memory import MemoryEntry
from pipeline.world import BAD, GOOD

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_QUESTIONS = DATA_DIR / "default_questions.txt"
DEFAULT_PRIOR = DATA_DIR / "default_prior.jsonl"

_TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_questions(source: str | None = None, column: str = "question", split: str = "train") -> list[str]:
    """The questions of a pool, stripped, in file order; ``None`` means the default pool."""
    path = Path(source).expanduser() if source else DEFAULT_QUESTIONS
    try:
        if path.suffix == ".txt":
            texts = path.read_text(encoding="utf-8").splitlines()
        else:
            from datasets import load_dataset

            if path.suffix in _TABLE_BUILDERS:
                if not path.is_file():
                    raise FileNotFoundError(f"no such file: {path}")
                dataset = load_dataset(_TABLE_BUILDERS[path.suffix], data_files=str(path), split="train")
            elif (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
                from datasets import DatasetDict, load_from_disk

                dataset = load_from_disk(str(path))  # a folder written by ``save_to_disk``
                if isinstance(dataset, DatasetDict):
                    dataset = dataset[split]
            else:
                dataset = load_dataset(str(source), split=split)
            if column not in dataset.column_names:
                raise UserError(
                    f"question pool {source} has no column {column!r} (columns: {', '.join(dataset.column_names)})"
                )
            texts = dataset[column]
    except UserError:
        raise
    except Exception as exc:  # any reader error becomes one line for the user
        raise UserError(f"cannot read question pool {path}: {_first_line(exc)}") from exc
    questions = [str(t).strip() for t in texts if t is not None and str(t).strip()]
    if not questions:
        raise UserError(f"question pool {path} holds no questions")
    return questions


def pool_fingerprint(questions: list[str]) -> str:
    """A short hash of a pool's content, saved with the run config to detect a changed pool."""
    return hashlib.sha256("\n".join(questions).encode()).hexdigest()[:16]


def load_prior(path: str | Path | None = None) -> dict[str, list[MemoryEntry]]:
    """Prior pairs by label (``good``/``bad``) from a JSON Lines file of question/answer/label rows."""
    path = Path(path).expanduser() if path else DEFAULT_PRIOR
    prior: dict[str, list[MemoryEntry]] = {GOOD: [], BAD: []}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("label") not in prior or not row.get("question") or not row.get("answer"):
                raise ValueError(f"line {number} needs question, answer and label good|bad")
            prior[row["label"]].append(MemoryEntry(row["question"].strip(), row["answer"].strip()))
    except Exception as exc:
        raise UserError(f"cannot read prior {path}: {_first_line(exc)}") from exc
    return prior
