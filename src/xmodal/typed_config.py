"""Typed configs: a dataclass built from a dict (TOML, JSON, keyword arguments), checked where it is read.

An unknown key is an error listing the valid ones; a value of the wrong kind (`"abc"` for an
int, a table for a string) is an error naming the field, the value and the expected type;
nested dataclass fields are built the same way. Nothing is silently converted, except the
lossless: an int where a float is expected, a list where a tuple is.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal


def _dataclass_in(hint) -> type | None:
    """The dataclass a field's type names (`X` or `X | None`), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return inner[0] if len(inner) == 1 else None
    return None


def fits(value: Any, hint) -> bool:
    """Whether `value` is of the type `hint` names (the kinds configs use)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        args = typing.get_args(hint)
        if not args:
            return True
        if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis):  # list[X], tuple[X, ...]
            return all(fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args))  # tuple[X, Y]
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True  # a type configs do not use: not checked here


def _describe(hint) -> str:
    return str(hint).replace("typing.", "") if not isinstance(hint, type) else hint.__name__


def build_config(cls: type, values: Any, where: str):
    """`cls(**values)`, nested dataclass fields built the same way; an unknown key or a value of
    the wrong kind is a ValueError naming `where`, the field and the valid keys or type."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a table of {cls.__name__} fields, got {values!r}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid: {valid}")
    hints = typing.get_type_hints(cls)
    values = dict(values)
    for name, value in values.items():
        inner = _dataclass_in(hints[name])
        if inner is not None and isinstance(value, dict):
            # an empty table means "none" where the field may be None (how older folders say "no layout")
            none_ok = inner is not hints[name]
            values[name] = None if (none_ok and not value) else build_config(inner, value, f"{where}.{name}")
        elif not fits(value, hints[name]):
            raise ValueError(f"{where}: {name} = {value!r} is not of type {_describe(hints[name])}")
    try:
        return cls(**values)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None
