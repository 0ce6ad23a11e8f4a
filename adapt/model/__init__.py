"""The diffusion model class. Its files (`CODE_FILES`, written by `write_remote_code`) are copied verbatim into every
checkpoint as remote code, so they import only torch, transformers and each other; `adapt.load` uses the very same
classes without remote code."""

from pathlib import Path

from .configuration_masked_diffusion import MaskedDiffusionConfig
from .modeling_masked_diffusion import AUTO_MAP, CODE_FILES, MaskedDiffusionLM, remote_code_fields, write_remote_code

MODEL_FILES = [Path(__file__).parent / name for name in CODE_FILES]

__all__ = ["AUTO_MAP", "CODE_FILES", "MODEL_FILES", "MaskedDiffusionConfig", "MaskedDiffusionLM", "remote_code_fields",
           "write_remote_code"]
