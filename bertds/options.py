"""Command-line options declared once, on the config dataclasses: each field's default, type, help and choices
live in its ``option(...)``; ``add_options`` turns them into argparse flags and ``from_args`` builds the config
back (so validation in the dataclass's ``__post_init__`` runs when the flags are parsed)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def option(
    default: Any = None,
    help: str = "",
    *,
    flag: str | None = None,
    choices: list | None = None,
    group: str | None = None,
    default_factory: Any = None,
) -> Any:
    """A dataclass field that is also a command-line flag (``--field-name`` unless ``flag`` says otherwise), listed
    under the ``--help`` section ``group`` (default: the parser's own options). A bool field becomes ``--flag`` when
    it defaults to False and ``--no-flag`` when it defaults to True."""
    metadata = {"help": help, "flag": flag, "choices": choices, "group": group}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _value_type(annotation: Any) -> tuple[type, bool]:
    """(element type, is a list) of a field annotation such as ``int | None`` or ``list[str] | None``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0]
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def option_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def redefault(cls: type, name: str, default: Any) -> Any:
    """The option ``name`` of ``cls`` with another default, for a subclass (help, flag, choices and group kept)."""
    inherited = next(f for f in option_fields(cls) if f.name == name)
    return dataclasses.field(default=default, metadata=inherited.metadata)


def flag_name(f: dataclasses.Field, prefix: str = "") -> str:
    return f.metadata["flag"] or "--" + (prefix + f.name).replace("_", "-")


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, skip: tuple[str, ...] = (), prefix: str = ""
) -> None:
    """Adds one flag per ``option`` field of ``cls`` (except those named in ``skip``), each under its ``group``'s
    section when ``parser`` is a parser; ``prefix`` goes before each field's name in its flag and its argparse dest
    (``prefix="eval_"``: ``split`` is ``--eval-split``)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in option_fields(cls):
        if f.name in skip:
            continue
        section, group = parser, f.metadata["group"]
        if group and isinstance(parser, argparse.ArgumentParser):
            if group not in groups:
                groups[group] = parser.add_argument_group(group)
            section = groups[group]
        value_type, is_list = _value_type(hints[f.name])
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[operator]  # option() sets one
        kwargs: dict[str, Any] = {"dest": prefix + f.name, "help": f.metadata["help"], "default": default}
        if value_type is bool:
            name = (
                flag_name(f, prefix)
                if not default
                else (f.metadata["flag"] or "--no-" + (prefix + f.name).replace("_", "-"))
            )
            section.add_argument(name, action="store_false" if default else "store_true", **kwargs)
            continue
        if is_list:
            kwargs["nargs"] = "+"
        if f.metadata["choices"]:
            kwargs["choices"] = f.metadata["choices"]
        section.add_argument(flag_name(f, prefix), type=value_type, **kwargs)


def from_args(cls: type[T], args: argparse.Namespace, prefix: str = "", **fields: Any) -> T:
    """The config of ``cls`` from parsed flags (added with the same ``prefix``; fields not on the command line
    come from ``fields``)."""
    values = {f.name: getattr(args, prefix + f.name) for f in option_fields(cls) if hasattr(args, prefix + f.name)}
    return cls(**{**values, **fields})
