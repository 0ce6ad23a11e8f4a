"""Every user-facing name that was renamed and is still accepted, in one table: the old name, the new one, where it
is given, and the release that removes it. Until then the old name works with one warning; giving both is an error.
A renamed key of a JSON result is written under both names until then. tests/test_structure.py fails once
`__version__` reaches a `removed_in`: that release deletes the row and the code that reads it, so no alias outlives
its release."""

from collections.abc import Callable
from dataclasses import dataclass

from .errors import AdaptError


@dataclass(frozen=True)
class Renamed:
    old: str
    new: str
    where: str
    removed_in: str


RENAMED = (
)


def renamed(where: str) -> dict[str, Renamed]:
    """The rows given in `where` (a prefix of their `where`), by old name."""
    return {r.old: r for r in RENAMED if r.where.startswith(where)}


def field_name(name: str) -> str:
    """The options field a flag or keyword sets: `--num-blocks` -> `num_blocks`."""
    return name.lstrip("-").replace("-", "_")


def take_renamed(options, where: str, both: Callable[[Renamed], str], warn: Callable[[Renamed], None]):
    """Moves each renamed option of `options` (an object with both names as attributes, unset = None) that was
    given under its old name to its new one, calling `warn(row)`; both names given is `AdaptError(both(row))`."""
    for row in renamed(where).values():
        old, new = field_name(row.old), field_name(row.new)
        value = getattr(options, old)
        if value is None:
            continue
        if getattr(options, new) is not None:
            raise AdaptError(both(row))
        warn(row)
        setattr(options, new, value)
        setattr(options, old, None)


def with_old_keys(result: dict, where: str) -> dict:
    """`result` with each renamed key present also written, right after it, under its old name."""
    old_of = {r.new: r.old for r in renamed(where).values()}
    out = {}
    for key, value in result.items():
        out[key] = value
        if key in old_of:
            out[old_of[key]] = value
    return out
