"""dlm-adapt: turn a pretrained causal language model into a masked diffusion language model."""

__version__ = "0.1.0"

from .convert import convert  # noqa: E402
from .errors import AdaptError  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .loading import load  # noqa: E402
from .model import MaskedDiffusionConfig, MaskedDiffusionLM  # noqa: E402
from .train import train  # noqa: E402

__all__ = ["AdaptError", "MaskedDiffusionConfig", "MaskedDiffusionLM", "__version__", "convert", "evaluate", "load",
           "train"]
