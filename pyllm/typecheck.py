"""One check of a config value against its field's annotation, shared by the configs that are built from files and
from the Python API (ModelConfig, TrainConfig, evaluation task files): the range checks that follow can then
compare values without a string, a bool or a NaN slipping through them."""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing

_WHAT = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def unwrap_optional(hint):
    """``X`` of ``X | None`` (``Optional[X]``); any other annotation as it is."""
    args = typing.get_args(hint)
    return next(a for a in args if a is not type(None)) if type(None) in args else hint


def type_problem(value, hint, scalar_as_list: bool = False) -> str | None:
    """None if ``value`` fits the annotation ``hint``, else what it must be ("an integer", "a finite number", ...).

    Checked: bool, int, float (any finite real; an int is a float), str, dict, ``list[X]`` and ``tuple[X, ...]``
    (either sequence, as JSON and YAML give lists) of those, and unions of them (``X | None``); other annotations
    (a Callable, a nested config class) pass. A bool is never a number (YAML's yes/no, Python's True).
    ``scalar_as_list``: a single X stands for a one-element list (a task file's ``stop: "Q:"``)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(members) < len(typing.get_args(hint)):
            return None
        problems = [type_problem(value, a, scalar_as_list) for a in members]
        return None if None in problems else " or ".join(problems)
    if typing.get_origin(hint) in (list, tuple):
        elem = typing.get_args(hint)[0]
        items = value if isinstance(value, (list, tuple)) else [value] if scalar_as_list else None
        if items is not None and all(type_problem(v, elem) is None for v in items):
            return None
        noun = _WHAT[elem].split(" ", 1)[1] if elem in _WHAT else "value"
        return f"a list of {noun}s" + (f" (or a single {noun})" if scalar_as_list else "")
    if (typing.get_origin(hint) or hint) is dict:
        return None if isinstance(value, dict) else "a mapping of keys to values"
    if hint not in _WHAT:
        return None
    if isinstance(value, bool):
        return None if hint is bool else _WHAT[hint]
    if not isinstance(value, {int: numbers.Integral, float: numbers.Real}.get(hint, hint)):
        return _WHAT[hint]
    if hint is float and not math.isfinite(value):
        return "a finite number"
    return None


def check_fields(obj, error: type[Exception] = ValueError, label: str | None = None) -> None:
    """Each field of the dataclass ``obj`` against its annotation; the first misfit is one ``error``
    "<label>: <name>=<value> must be <what>" (label: the class name). Call it first in ``__post_init__``: the
    range checks after it may then compare values."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if (want := type_problem(value := getattr(obj, f.name), hints[f.name])) is not None:
            raise error(f"{label or type(obj).__name__}: {f.name}={value!r} must be {want}")
