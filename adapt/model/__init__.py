"""The diffusion model class. Its two files are copied verbatim into every converted checkpoint (remote code),
so they import only torch and transformers; `adapt.load` uses the very same classes without remote code."""

from pathlib import Path

from .configuration_masked_diffusion import MaskedDiffusionConfig
from .modeling_masked_diffusion import AUTO_MAP, CODE_FILES, MaskedDiffusionLM

MODEL_FILES = [Path(__file__).parent / name for name in CODE_FILES]

__all__ = ["AUTO_MAP", "MODEL_FILES", "MaskedDiffusionConfig", "MaskedDiffusionLM"]
