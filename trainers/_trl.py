"""Every name this package takes from TRL's private API, in one place.

TRL exports its trainers and configs from `trl`; the helpers below live in its submodules and may move between
releases. The trainer is meant to be reused inside other TRL projects, so pyproject only sets a minimum TRL version
instead of pinning one: when a release moves one of these names, importing `trainers` fails here with the name, and
`tests/test_trainer_contract.py` lists every missing one.
"""

from __future__ import annotations

from importlib.metadata import version

try:
    from trl.data_utils import common_prefix_length
    from trl.trainer.base_trainer import _BaseTrainer
    from trl.trainer.utils import (
        add_fused_lm_head,
        create_model_from_path,
        disable_dropout_in_model,
        get_config_model_id,
        global_then_local_main_first,
        pad,
    )
except ImportError as error:
    raise ImportError(
        f"{error}: the Stable Alignment trainer uses this private TRL name, which trl {version('trl')} no longer "
        "provides. Install the trl release it was tested with (see pyproject.toml) or update trainers/_trl.py."
    ) from error

__all__ = [
    "_BaseTrainer",
    "add_fused_lm_head",
    "common_prefix_length",
    "create_model_from_path",
    "disable_dropout_in_model",
    "get_config_model_id",
    "global_then_local_main_first",
    "pad",
]
