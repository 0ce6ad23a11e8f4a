# Written into every converted checkpoint as remote code: imports only torch and transformers.
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class MaskedDiffusionConfig(PreTrainedConfig):
    r"""
    Configuration of a masked diffusion language model adapted from a causal decoder by dlm-adapt.

    The decoder's own configuration is kept whole in `text_config` (any decoder transformers builds with its
    standard mask utilities), so the weights are those of the original architecture.

    Args:
        text_config (`dict` or `PreTrainedConfig`):
            Configuration of the base causal decoder (its `model_type` names the architecture).
        mask_token_id (`int`):
            Vocabulary id of the [MASK] token that marks noised positions.
        shift (`bool`, defaults to `True`):
            Keep the autoregressive alignment: the logit at position i-1 predicts the token at position i.
            Loss, sampler and likelihood all read this one flag.
        bidirectional (`bool`, defaults to `True`):
            Attend without the causal mask (the denoiser sees the whole canvas).
        provenance (`dict`, *optional*):
            Where the weights came from: source, revision, converter version, how the mask token was chosen.
    """

    model_type = "masked_diffusion_lm"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    mask_token_id: int | None = None
    shift: bool = True
    bidirectional: bool = True
    provenance: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # transformers' mask builders read `is_causal` from the decoder config; keep it derived from ours.
        self.text_config.is_causal = not self.bidirectional
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))


__all__ = ["MaskedDiffusionConfig"]
