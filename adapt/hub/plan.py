"""What a push uploads, and what the model card says about it: `push` makes the plan, `card` reads it."""

from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import Validated
from ..config import TrainConfig


@dataclass
class Plan:
    """What a push uploads, and what the card says about it."""

    kind: str  # "checkpoint" or "adapter"
    files: list[tuple[str, Path]]
    checkpoint: Validated | None  # for an adapter: its base, when that is a local directory
    adapter: dict | None = None
    adapter_parameters: int = 0
    training: TrainConfig | None = None  # the run's recorded config (SFTConfig for `dlm-adapt sft`)
    metrics: list[dict] = field(default_factory=list)
    readme: str | None = None

