"""Command lines generated from config dataclasses, TRL-style.

A stage's config dataclass is the single source of truth: each field's type, default and
``metadata={"help": ...}`` become a flag, so documentation, command line and validation (the
dataclass's ``__post_init__``) cannot drift apart. On top of what ``HfArgumentParser`` offers,
this layer handles nested config dataclasses (``--agent.model``: a dotted flag per nested field)
and ``--config FILE.yaml`` whose values the flags override.

Flag values are typed from the annotations: ``bool`` fields take ``--x/--no-x``; lists take
several values (``--seeds 0 1 2``); ``Literal`` fields list their choices; dicts and other
structured values are read as YAML (``--mix '{imitation: 5}'``); ``none`` sets an optional
field to ``None``. Field metadata may add ``"aliases"`` (extra option strings) and
``"cli": False`` (not on the command line, config file only) and ``"positional": True`` (an
argument without a flag). A stage adds flags that are not config fields (``--no-progress``) with
``extend``; they stay out of the config and are read from the returned namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from pipeline.errors import UserError

T = TypeVar("T")
_NONE_WORDS = ("none", "null")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _nested_dataclass(tp: Any) -> type | None:
    base, _ = _strip_optional(tp)
    return base if dataclasses.is_dataclass(base) and isinstance(base, type) else None


def _iter_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """``(dotted name, field, type)`` of every command-line field, nested dataclasses flattened."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli", True) is False:
            continue
        tp = hints[f.name]
        nested = _nested_dataclass(tp)
        if nested is not None:
            yield from _iter_fields(nested, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def _converter(dotted: str, tp: Any) -> tuple[Callable[[str], Any], dict[str, Any]]:
    """A string -> value function for one flag, plus extra ``add_argument`` keywords."""
    base, optional = _strip_optional(tp)
    origin = typing.get_origin(base)

    def nullable(convert: Callable[[str], Any]) -> Callable[[str], Any]:
        def parse(text: str) -> Any:
            if optional and text.strip().lower() in _NONE_WORDS:
                return None
            try:
                return convert(text)
            except (TypeError, ValueError, yaml.YAMLError) as exc:
                raise argparse.ArgumentTypeError(f"invalid value {text!r} for --{dotted}") from exc

        return parse

    if origin is Literal:
        choices = typing.get_args(base)
        kinds = {type(c) for c in choices}
        convert = kinds.pop() if len(kinds) == 1 else str
        return nullable(convert), {"metavar": "{" + ",".join(map(str, choices)) + "}"}
    if origin in (list, tuple, Sequence) or base in (list, tuple):
        (item,) = typing.get_args(base)[:1] or (str,)
        convert, _ = _converter(dotted, item)
        return convert, {"nargs": "+"}
    if base in (int, float, str):
        return nullable(base), {}
    if base is Path:
        return nullable(str), {}
    return nullable(yaml.safe_load), {"metavar": "YAML"}


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with ``--config`` and one flag per (nested) field of ``cls``.

    Defaults are suppressed: only the flags given on the command line appear in the namespace,
    under their dotted field names, so they can override the config file field by field.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of config fields; flags override it")
    for dotted, f, tp in _iter_fields(cls):
        positional = f.metadata.get("positional", False)
        names = [dotted] if positional else [f"--{dotted.replace('_', '-')}"]
        if "_" in dotted and not positional:
            names.append(f"--{dotted}")
        names += list(f.metadata.get("aliases", ()))
        help_ = f.metadata.get("help", "")
        if f.default not in (dataclasses.MISSING, None) and "." not in dotted:
            help_ = f"{help_} (default: {f.default!r})" if help_ else f"default: {f.default!r}"
        base, _ = _strip_optional(tp)
        kwargs: dict[str, Any] = {"help": help_.replace("%", "%%")}
        if not positional:
            kwargs["dest"] = dotted
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            convert, extra = _converter(dotted, tp)
            kwargs |= {"type": convert, **extra}
            if positional and extra.get("nargs") == "+":
                kwargs["nargs"] = "*"  # may come from --config instead; the dataclass checks it
        parser.add_argument(*names, **kwargs)
    return parser


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        if data.get(key) is None:
            data[key] = {}
        if not isinstance(data[key], dict):
            raise UserError(f"{dotted}: {key} is not a mapping")
        data = data[key]
    data[leaf] = value


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """A YAML file of config fields, as a mapping."""
    try:
        loaded = yaml.safe_load(Path(path).expanduser().read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read config {path}: {str(exc).splitlines()[0]}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"config {path} is not a mapping of fields")
    return loaded


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build a (nested) config dataclass from plain data, refusing unknown fields.

    The dataclass's ``__post_init__`` does the checks; a ``TypeError``/``ValueError`` it raises
    (a wrong type in a YAML file, say) becomes a :class:`UserError`.
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise UserError(f"{where or cls.__name__} must be a mapping of fields")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"unknown {where + ' ' if where else ''}field(s): {', '.join(unknown)}")
    missing = [
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:  # named as flags: what a user of the command line has to add
        prefix = f"{where}." if where else ""
        raise UserError(
            "missing "
            + ", ".join(
                name.upper()
                if fields[name].metadata.get("positional")
                else f"--{prefix}{name}".replace("_", "-")
                for name in missing
            )
        )
    kwargs = {}
    for name, value in data.items():
        nested = _nested_dataclass(hints[name])
        if nested is not None and value is not None:
            value = from_dict(nested, value, f"{where}.{name}" if where else name)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except UserError:
        raise
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad config{' ' + where if where else ''}: {exc}") from exc


def config_data(args: argparse.Namespace, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """The config file's fields (if ``--config``), then the flags given, by dotted path."""
    flags = {k: v for k, v in vars(args).items() if k not in exclude}
    path = flags.pop("config", None)
    data = load_yaml_config(path) if path else {}
    for dotted, value in flags.items():
        if value != []:  # an empty positional list: not given on the command line
            _set_path(data, dotted, value)
    return data


def parse(
    cls: type[T],
    argv: Sequence[str] | None,
    prog: str,
    description: str,
    extend: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[T, argparse.Namespace]:
    """Parse ``argv`` into a validated ``cls``; the namespace keeps every flag given.

    ``extend`` adds the command's own flags (not config fields); give them explicit defaults,
    since the parser's defaults are suppressed.
    """
    parser = build_parser(cls, prog, description)
    fields = {action.dest for action in parser._actions}
    if extend is not None:
        extend(parser)
    own = [action.dest for action in parser._actions if action.dest not in fields]
    args = parser.parse_args(argv)
    return from_dict(cls, config_data(args, exclude=own)), args
