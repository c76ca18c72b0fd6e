"""Parsing and validating stage parameters from JSON, shared by the stage modules.

``params_from_json`` builds a frozen parameter dataclass from a JSON object, and
``require`` is the check its ``__post_init__`` uses; both raise ``PermanentError``.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, TypeVar

from imgpipe.errors import PermanentError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["is_number", "params_from_json", "require"]

_Params = TypeVar("_Params", bound="DataclassInstance")


def require(condition: bool, owner: str, message: str) -> None:
    """Raise ``PermanentError("<owner>: <message>")`` unless ``condition`` holds."""
    if not condition:
        raise PermanentError(f"{owner}: {message}")


def is_number(value: object) -> bool:
    """An ``int`` or ``float`` JSON value; a ``bool`` is not a number."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def params_from_json(cls: type[_Params], data: Mapping[str, object]) -> _Params:
    """Build the frozen dataclass ``cls`` from JSON, refusing unknown keys and wrong types.

    Shared by the stage parameter classes. Only ``int``, ``float`` and ``bool`` fields
    are supported; an ``int`` is accepted for a ``float`` field, a ``bool`` is never a
    number, NaN and infinity are refused. Missing keys keep their defaults.
    """
    name = cls.__name__
    require(isinstance(data, Mapping), name, f"expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = sorted(f.name for f in fields(cls))
    values: dict[str, object] = {}
    for key, value in data.items():
        require(key in known, name, f"unknown key {key!r}; expected one of {', '.join(known)}")
        expected = hints[key]
        if expected is float and is_number(value):
            value = float(typing.cast(float, value))
            ok = math.isfinite(value)
        elif expected is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, expected)
        require(
            ok,
            name,
            f"key {key!r} must be a finite {expected.__name__}, got {type(value).__name__} "
            f"{value!r}",
        )
        values[key] = value
    return cls(**values)
