"""The one checker of option values that arrive as a mapping: a recipe's nested YAML sections, and the model args
lm-evaluation-harness hands the `dlm-adapt` backend. `from_dict` builds a config dataclass (sections recursively),
`check_value` checks one value against its field's type; the dataclass's own `__post_init__` then checks ranges
and combinations (`ranges.check_ranges`, `FieldError`).

Text becomes a value one way: as YAML (`parse_value`, YAML 1.1 plus floats such as "3e-4"), for a recipe file, its
`key=value` overrides and the strings lm-eval passes ("16", "True"). The flat command lines are HfArgumentParser's,
built from the same kind of dataclasses (`config/commands.py`)."""

import dataclasses
import types
import typing
from typing import Any, Literal

import yaml

from ..errors import AdaptError
from ..ranges import FieldError


def parse_value(text: str):
    """A text value as YAML: `16` is an int, `true` a bool, `null` (or nothing) None, `[1, 2]` a list."""
    return yaml.safe_load(text) if text != "" else None


def from_dict(cls, data: dict, prefix: str = "", what: str = "config key", text: bool = False):
    """`cls(**data)` with each key known and each value of its field's type; a dataclass-typed field is a section
    (`prefix` names it in messages). `what` is what the keys are called in messages ("config key", "model arg");
    with `text`, a string given for a field that takes no string is parsed first (`parse_value`)."""
    if not isinstance(data, dict):
        raise AdaptError(f"{what} {prefix.rstrip('.') or '(top level)'} must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise AdaptError(f"unknown {what} '{prefix}{key}' (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value or {}, f"{prefix}{name}.", what, text)
            continue
        if text and isinstance(value, str) and not _takes(hint, str):
            try:
                value = parse_value(value)
            except yaml.YAMLError:
                pass  # check_value names the field and the type it takes
        if text and isinstance(value, float) and value.is_integer() and _takes(hint, int):
            value = int(value)  # lm-eval's command line reads a negative number as a float (-1.0)
        try:
            kwargs[name] = check_value(value, hint, f"{prefix}{name}", what)
        except AdaptError as e:
            meta = fields[name].metadata
            help_text = meta.get("help", "").replace("%(choices)s", ", ".join(meta.get("choices", ())))
            raise AdaptError(f"{e} ({name}: {help_text})" if help_text else str(e)) from None
    try:
        return cls(**kwargs)
    except FieldError as e:  # the dataclass knows its own field, not the section it sits in
        raise AdaptError(e.message(prefix, what)) from None


def _takes(hint, kind) -> bool:
    """Whether a field of type `hint` takes values of type `kind`."""
    if hint is kind or hint is Any:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_takes(arg, kind) for arg in typing.get_args(hint))
    return typing.get_origin(hint) is Literal and any(isinstance(a, kind) for a in typing.get_args(hint))


def check_value(value, hint, key: str, what: str = "config key"):
    """`value` as field `key`'s type `hint` (an int where a float is asked becomes one), else one error line."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise AdaptError(f"{what} '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return check_value(value, arg, key, what)
            except AdaptError:
                continue
        raise AdaptError(f"{what} '{key}' has invalid value {value!r} (expected {hint})")
    if hint is type(None):
        if value is not None:
            raise AdaptError(f"{what} '{key}' must be null")
        return None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise AdaptError(f"{what} '{key}' must be a list, got {value!r}")
        if origin is tuple and Ellipsis not in args and len(value) != len(args):  # tuple[float, float]: a pair
            raise AdaptError(f"{what} '{key}' must be a list of {len(args)} values, got {value!r}")
        return origin(check_value(v, args[0], key, what) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise AdaptError(f"{what} '{key}' must be {hint.__name__}, got {value!r}")
    return value
