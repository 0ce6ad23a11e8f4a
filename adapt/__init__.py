"""dlm-adapt: turn a pretrained causal language model into a masked diffusion language model.

The public names below are imported on first use, so `import adapt` (and the CLI's argument parsing, `--help`)
does not pay for torch and transformers.
"""

import importlib
import logging

__version__ = "0.8.0"  # also DLM_ADAPT_VERSION in model/transformers_compat.py, stamped into remote code

# name -> the module that defines it. The stages are subpackages (`conversion`, `training`, `sampling`, `evaluation`,
# `hub`) whose names differ from these functions', so importing a submodule never replaces one of them.
_EXPORTS = {
    "AdaptError": "errors",
    "MaskedDiffusionConfig": "model",
    "MaskedDiffusionLM": "model",
    "SFTConfig": "config",
    "SamplingOptions": "config",
    "TrainConfig": "config",
    "load_config": "config",
    "convert": "conversion.convert",
    "evaluate": "evaluation.harness",
    "generate": "sampling.generate",
    "load": "checkpoint",
    "push_to_hub": "hub.push",
    "serve": "serving.app",
    "sft": "training.recipe",
    "train": "training.recipe",
    "upgrade": "hub.upgrade",
}
__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'adapt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


class _DropMissingKernelsNotice(logging.Filter):
    """bitsandbytes logs a warning at import on CPUs with AVX512-BF16 when the optional `kernels` package (a faster
    4-bit CPU matmul fetched from the Hub) is absent. It then uses its own kernels, so QLoRA works; the line only
    alarms users of every command. Real bitsandbytes errors are raised or logged otherwise and still show."""

    def filter(self, record):
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMissingKernelsNotice())
