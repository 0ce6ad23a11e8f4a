"""Every option in one place: documented dataclasses, one checker, one way text becomes a value.

- `commands`: the one-shot commands' options (`ConvertOptions`, `GenerateOptions`, `EvalOptions`, `PushOptions`,
  `UpgradeOptions`, `ServeOptions`), from which `dlm-adapt` generates its flags and `--help` with transformers'
  `HfArgumentParser`; `SamplingOptions`, the decoding settings every front end hands to the sampler;
  `SourceOptions`, how a causal source is converted (`convert`'s flags and a recipe's `model:` section);
  `LmEvalModelArgs`, the lm-eval backend's `--model_args`.
- `recipes`: training and SFT (`TrainConfig`, `SFTConfig` and their sections), loaded from YAML recipes with
  `dotted.key=value` overrides (`load_config`), recorded in each run's OUTPUT/config.json (`to_dict`, `run_config`).
  A recipe nests sections (`model.path`, `train.lr`, `block.size`), which HfArgumentParser cannot: it makes one flat
  flag per field, so a section is one flag whose mapping `parse_dict` passes through unbuilt and unchecked. So recipes keep their YAML loader, the only nested
  one, and share everything else with the commands.
- `parsing`: `from_dict`, the one value checker for mappings (a recipe's sections, lm-eval's model args), and
  `parse_value`, text as YAML (recipe overrides, the strings lm-eval passes).

Names resolve on first use, so the command line parses without importing torch (which `recipes` needs).
"""

import importlib

_COMMANDS = ("METRICS", "DTYPE_NAMES", "ConvertOptions", "EvalOptions", "GenerateOptions", "Ints", "LmEvalModelArgs",
             "Names", "PushOptions", "SamplerChoices", "SamplingOptions", "ServeOptions", "SourceOptions", "Texts",
             "UpgradeOptions")
_RECIPES = ("DEPRECATED_KEYS", "DTYPES", "RUN_KINDS", "DataConfig", "LoraOptions", "ModelConfig", "SFTConfig",
            "SFTDataConfig", "TrainConfig", "TrainOptions", "load_config", "run_config", "to_dict")
_PARSING = ("check_value", "from_dict", "parse_value")
__all__ = [*_COMMANDS, *_RECIPES, *_PARSING]


def __getattr__(name):
    if name not in __all__:
        raise AttributeError(f"module 'adapt.config' has no attribute {name!r}")
    module = "commands" if name in _COMMANDS else "parsing" if name in _PARSING else "recipes"
    return getattr(importlib.import_module(f".{module}", __name__), name)
