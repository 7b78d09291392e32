"""The Stable Alignment trainer, TRL-style.

- `stable_alignment_loss` / `stable_alignment_diagnostics`: the pure loss, reusable in any trainer.
- `StableAlignmentConfig`: the training arguments (a `transformers.TrainingArguments`).
- `StableAlignmentTrainer`: a `transformers.Trainer` for comparison groups (prompt, completions, scores).
- `DataCollatorForComparisonGroups`: flattens a batch of groups into one padded tensor plus a `[B, K]` mask.
- `load_comparison_groups` / `validate_groups`: load groups from the Hub, a folder or files; refuse bad rows up front.
"""

from .collator import DataCollatorForComparisonGroups
from .config import StableAlignmentConfig
from .data import load_comparison_groups, validate_groups
from .loss import (
    StableAlignmentDiagnostics,
    best_completion_index,
    stable_alignment_diagnostics,
    stable_alignment_loss,
)
from .trainer import StableAlignmentTrainer

__all__ = [
    "DataCollatorForComparisonGroups",
    "StableAlignmentConfig",
    "StableAlignmentDiagnostics",
    "StableAlignmentTrainer",
    "best_completion_index",
    "load_comparison_groups",
    "stable_alignment_diagnostics",
    "stable_alignment_loss",
    "validate_groups",
]
