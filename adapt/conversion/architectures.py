"""Which decoders dlm-adapt converts: one row of facts per `model_type`, everything else is generic code.

A row is added only when the test case table (tests/tiny_models.py) builds that architecture and the
invariants hold for it: ratio-0 equivalence, bidirectionality in every layer type, padding invariance.
"""

from dataclasses import dataclass

from transformers import PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..errors import AdaptError


@dataclass(frozen=True)
class Architecture:
    family: str
    #: the decoder accepts a dict {layer type: mask} (models with `config.layer_types`); the others take one
    #: prebuilt 4-D mask for all layers, sliding if `config.sliding_window` is set
    layer_type_masks: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("LLaMA 2/3, SmolLM, TinyLlama"),
    "mistral": Architecture("Mistral"),
    "qwen2": Architecture("Qwen2 / Qwen2.5", layer_type_masks=True),
    "qwen3": Architecture("Qwen3", layer_type_masks=True),
    "qwen3_moe": Architecture("Qwen3-MoE"),
    "gemma2": Architecture("Gemma 2", layer_type_masks=True),
    "gemma3_text": Architecture("Gemma 3 (text)", layer_type_masks=True),
    "phi3": Architecture("Phi-3"),
    "gpt2": Architecture("GPT-2"),
    "olmo2": Architecture("OLMo 2"),
}


_ENCODER_ONLY = {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "albert", "electra", "deberta",
                 "deberta-v2", "modernbert", "ernie", "megatron-bert", "roformer"}
_STATE_SPACE = {"mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm"}


def supported_list() -> str:
    return ", ".join(ARCHITECTURES)


def check_architecture(config: PreTrainedConfig) -> Architecture:
    """The table row for `config`, or one clear error saying why it cannot be converted."""
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if getattr(config, "is_encoder_decoder", False):
        kind = "an encoder-decoder model"
    elif model_type in _ENCODER_ONLY:
        kind = "an encoder-only model"
    elif model_type in _STATE_SPACE or hasattr(config, "state_size"):
        kind = "a state-space / recurrent model, without attention to make bidirectional"
    elif model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        kind = "a causal LM that dlm-adapt has not verified"
    else:
        kind = "not a decoder-only causal LM"
    raise AdaptError(
        f"unsupported architecture '{model_type}': {kind}. dlm-adapt converts these decoder model types: "
        f"{supported_list()}"
    )
