"""Every option in one place: documented dataclasses.

- `recipes`: training and SFT (`TrainConfig`, `SFTConfig` and their sections), loaded from YAML recipes with
  `dotted.key=value` overrides (`load_config`), recorded in each run's OUTPUT/config.json (`to_dict`, `run_config`).
- `commands`: the one-shot commands' options (`ConvertOptions`, `GenerateOptions`, `EvalOptions`, `PushOptions`,
  `UpgradeOptions`, `ServeOptions`), from which `dlm-adapt` generates its flags and `--help`; `SamplingOptions`, the
  decoding settings every front end hands to the sampler.

Names resolve on first use, so the command line parses without importing torch (which `recipes` needs).
"""

import importlib

_COMMANDS = ("METRICS", "DTYPE_NAMES", "ConvertOptions", "EvalOptions", "GenerateOptions", "Ints", "Names",
             "PushOptions", "SamplerChoices", "SamplingOptions", "ServeOptions", "Texts", "UpgradeOptions")
_RECIPES = ("DEPRECATED_KEYS", "DTYPES", "RUN_KINDS", "DataConfig", "LoraOptions", "ModelConfig", "SFTConfig",
            "SFTDataConfig", "TrainConfig", "TrainOptions", "from_dict", "load_config", "run_config", "to_dict")
__all__ = [*_COMMANDS, *_RECIPES]


def __getattr__(name):
    if name not in __all__:
        raise AttributeError(f"module 'adapt.config' has no attribute {name!r}")
    module = importlib.import_module(f".{'commands' if name in _COMMANDS else 'recipes'}", __name__)
    return getattr(module, name)
