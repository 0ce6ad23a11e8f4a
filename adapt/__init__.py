"""dlm-adapt: turn a pretrained causal language model into a masked diffusion language model."""

__version__ = "0.1.0"

from .config import SFTConfig, TrainConfig, load_config  # noqa: E402
from .convert import convert  # noqa: E402
from .errors import AdaptError  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .loading import load  # noqa: E402
from .model import MaskedDiffusionConfig, MaskedDiffusionLM  # noqa: E402
from .push import push_to_hub  # noqa: E402
from .train import sft, train  # noqa: E402

__all__ = ["AdaptError", "MaskedDiffusionConfig", "MaskedDiffusionLM", "SFTConfig", "TrainConfig", "__version__",
           "convert", "evaluate", "load", "load_config", "push_to_hub", "sft", "train"]
