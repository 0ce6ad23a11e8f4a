"""Every user-facing name that was renamed and is still accepted, in one table: the old name, the new one, where it
is given, and the release that removes it. Until then the old name works with one warning, and giving both is an
error; a renamed key of a JSON result is written under both names. The code that accepts an old name names it (or
its last dotted part), so that nothing reads a row nobody handles. tests/test_structure.py fails once
`__version__` reaches a `removed_in`: that release deletes the row and the code that reads it, so no alias outlives
its release. Empty since 0.7.0 removed the last renames (the README names each removed name beside its successor)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Renamed:
    old: str
    new: str
    where: str
    removed_in: str


RENAMED: tuple[Renamed, ...] = ()
