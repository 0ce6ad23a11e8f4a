"""Every user-facing name that was renamed and is still accepted, in one table: the old name, the new one, where it
is given, and the release that removes it. Until then the old name works with one warning; giving both is an error.
tests/test_structure.py fails once `__version__` reaches a `removed_in`: that release deletes the row and the code
that reads it, so no alias outlives its release."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Renamed:
    old: str
    new: str
    where: str
    removed_in: str


RENAMED = (
    # the packing length was called block_length; "block" is the diffusion/decoding block only
    Renamed("data.block_length", "data.seq_length", "recipe key (YAML, key=value)", "0.6.0"),
    Renamed("--block-length", "--seq-length", "dlm-adapt eval flag", "0.6.0"),
    Renamed("block_length", "seq_length", "adapt.evaluate keyword", "0.6.0"),
    # the lm-eval backend moved with the evaluation stage (adapt/evaluation/)
    Renamed("python -m adapt.lm_eval_backend", "python -m adapt.evaluation.lm_eval_backend", "command", "0.7.0"),
)


def renamed(where: str) -> dict[str, Renamed]:
    """The rows given in `where` (a prefix of their `where`), by old name."""
    return {r.old: r for r in RENAMED if r.where.startswith(where)}
