"""Numeric ranges of config fields, one table per config dataclass, checked in its `__post_init__`.

A range is written as an interval: `"[1, inf)"`, `"(0, 1)"`. None (an unset optional field) is always allowed;
each element of a list or tuple is checked."""

import math
import re

from .errors import AdaptError

_INTERVAL = re.compile(r"^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$")


class FieldError(AdaptError):
    """A bad config field, raised by its dataclass; `key` lets the config loader prefix the section (`train.lr`)."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(self.message())

    def message(self, prefix: str = "", what: str = "config key") -> str:
        return f"{what} '{prefix}{self.key}' {self.problem}"


class RangeError(FieldError):
    def __init__(self, key: str, interval: str, value):
        super().__init__(key, f"must be in {interval}, got {value!r}")


def _inside(value: float, interval: str) -> bool:
    low_bracket, low, high, high_bracket = _INTERVAL.match(interval).groups()
    low, high = float(low), float(high)
    if math.isnan(value):
        return False
    above = value >= low if low_bracket == "[" else value > low
    below = value <= high if high_bracket == "]" else value < high
    return above and below


def check_ranges(obj, table: dict[str, str]):
    for key, interval in table.items():
        value = getattr(obj, key)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and not _inside(v, interval):
                raise RangeError(key, interval, value)
