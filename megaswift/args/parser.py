"""Dataclass argument groups -> argparse, with Megatron-SWIFT's `--flag true|false` booleans."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Union, get_args, get_origin

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def str2bool(text: str) -> bool:
    low = str(text).lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _base_type(tp):
    if get_origin(tp) is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def add_dataclass(parser: argparse.ArgumentParser, cls) -> None:
    """Add one `--name` option per field of dataclass `cls`."""
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text, "default": argparse.SUPPRESS}
        if tp is bool:
            kwargs.update(type=str2bool, nargs="?", const=True, metavar="true|false")
        elif get_origin(tp) in (list, tuple):
            kwargs.update(type=get_args(tp)[0], nargs="+")
        elif tp in (int, float, str):
            kwargs.update(type=tp)
        else:
            kwargs.update(type=str)
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        group.add_argument(f"--{f.name}", **kwargs)


def parse(classes: tuple, argv: list[str], prog: str) -> tuple:
    """Parse `argv` into one instance per dataclass in `classes` (their __post_init__ checks run)."""
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False)
    for cls in classes:
        add_dataclass(parser, cls)
    ns = vars(parser.parse_args(argv))
    out = []
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in ns.items() if k in names}
        inst = cls(**given)
        object.__setattr__(inst, "_explicit", frozenset(given))
        out.append(inst)
    return tuple(out)


def explicit(args) -> frozenset:
    """The flags of the argument group `args` that the command line set (the rest are defaults)."""
    return getattr(args, "_explicit", frozenset())
