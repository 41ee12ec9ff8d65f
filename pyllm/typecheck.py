"""One check of a config value against its field's annotation, shared by the configs that are built from files and
from the Python API (ModelConfig, TrainConfig, evaluation task files): the range checks that follow can then
compare values without a string, a bool or a NaN slipping through them."""

from __future__ import annotations

import math
import numbers
import typing

_WHAT = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def unwrap_optional(hint):
    """``X`` of ``X | None`` (``Optional[X]``); any other annotation as it is."""
    args = typing.get_args(hint)
    return next(a for a in args if a is not type(None)) if type(None) in args else hint


def type_problem(value, hint, scalar_as_list: bool = False) -> str | None:
    """None if ``value`` fits the annotation ``hint``, else what it must be ("an integer", "a finite number", ...).

    Checked: bool, int, float (any finite real; an int is a float), str, ``X | None`` and ``list[X]`` of those;
    other annotations (dict, ...) are not checked. A bool is never a number (YAML's yes/no, Python's True).
    ``scalar_as_list``: a single X stands for a one-element ``list[X]`` (a task file's ``stop: "Q:"``)."""
    if value is None and type(None) in typing.get_args(hint):
        return None
    hint = unwrap_optional(hint)
    if typing.get_origin(hint) is list:
        elem = typing.get_args(hint)[0]
        if elem not in _WHAT:
            return None
        items = value if isinstance(value, (list, tuple)) else [value] if scalar_as_list else None
        if items is not None and all(type_problem(v, elem) is None for v in items):
            return None
        noun = _WHAT[elem].split(" ", 1)[1]
        return f"a list of {noun}s" + (f" (or a single {noun})" if scalar_as_list else "")
    if hint not in _WHAT:
        return None
    if isinstance(value, bool):
        return None if hint is bool else _WHAT[hint]
    if not isinstance(value, {int: numbers.Integral, float: numbers.Real}.get(hint, hint)):
        return _WHAT[hint]
    if hint is float and not math.isfinite(value):
        return "a finite number"
    return None
