"""dlm-adapt: turn a pretrained causal language model into a masked diffusion language model.

The public names below are imported on first use, so `import adapt` (and the CLI's argument parsing, `--help`)
does not pay for torch and transformers.
"""

import logging
import sys
import types

__version__ = "0.5.0"  # also DLM_ADAPT_VERSION in model/transformers_compat.py, stamped into remote code

# name -> submodule that defines it
_EXPORTS = {
    "AdaptError": "errors",
    "MaskedDiffusionConfig": "model",
    "MaskedDiffusionLM": "model",
    "SFTConfig": "config",
    "TrainConfig": "config",
    "load_config": "config",
    "convert": "convert",
    "evaluate": "evaluate",
    "load": "checkpoint",
    "push_to_hub": "push",
    "sft": "train",
    "train": "train",
    "upgrade": "upgrade",
}
__all__ = ["__version__", *sorted(_EXPORTS)]


class _Package(types.ModuleType):
    """`adapt.convert`, `adapt.evaluate`, `adapt.train` and `adapt.upgrade` name functions, as they always have,
    although submodules of those names exist: importing the submodule must not replace the function."""

    def __getattr__(self, name):
        if name not in _EXPORTS:
            raise AttributeError(f"module 'adapt' has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return  # the import system announcing submodule `adapt.<name>`; it stays in sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


class _DropMissingKernelsNotice(logging.Filter):
    """bitsandbytes logs a warning at import on CPUs with AVX512-BF16 when the optional `kernels` package (a faster
    4-bit CPU matmul fetched from the Hub) is absent. It then uses its own kernels, so QLoRA works; the line only
    alarms users of every command. Real bitsandbytes errors are raised or logged otherwise and still show."""

    def filter(self, record):
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMissingKernelsNotice())
