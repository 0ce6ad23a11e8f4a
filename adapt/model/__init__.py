"""The diffusion model class. Its two files are copied verbatim into every converted checkpoint (remote code),
so they import only torch and transformers; `adapt.load` uses the very same classes without remote code."""

from pathlib import Path

from .configuration_masked_diffusion import MaskedDiffusionConfig
from .modeling_masked_diffusion import MaskedDiffusionLM

_HERE = Path(__file__).parent
MODEL_FILES = [_HERE / "configuration_masked_diffusion.py", _HERE / "modeling_masked_diffusion.py"]

__all__ = ["MODEL_FILES", "MaskedDiffusionConfig", "MaskedDiffusionLM"]
