# Written into every converted checkpoint as remote code: imports only torch and transformers.
# Imports nothing from beside it: transformers 5.5 copies only a remote config's direct relative imports.
from transformers import AutoConfig, PreTrainedConfig

# shift when a config does not say (no dlm-adapt checkpoint lacks it): the causal LM's alignment, as `convert` writes
SHIFT_DEFAULT = True


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
        block_size (`int`, *optional*):
            Block diffusion: attention is bidirectional inside blocks of this many tokens (counted by position id)
            and causal between blocks. `None` (the default) is full-sequence diffusion.
        drafter (`dict`, *optional*):
            A drafter checkpoint (speculative decoding): the drafter adapter's shape, {"rank", "alpha", "targets"}
            (see `drafter_masked_diffusion.DrafterAdapter`), and "reads": what its masks attend to
            ("parent_cache"; absent in 0.5.1 checkpoints). Needs `block_size`, the default draft length.
        provenance (`dict`, *optional*):
            Where the weights came from: source, revision, converter version, how the mask token was chosen.
    """

    model_type = "masked_diffusion_lm"
    # The classic form (an explicit __init__ and `sub_configs`) on purpose: every 5.x release keeps it working for
    # the many remote-code configs written that way, while the declarative forms changed twice within 5.x.
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config=None, mask_token_id=None, shift=SHIFT_DEFAULT, bidirectional=True, provenance=None,
                 block_size=None, drafter=None, **kwargs):
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                       or block_size < 1):
            raise ValueError(f"block_size must be a positive integer or None (full-sequence diffusion), got "
                             f"{block_size!r}")
        if drafter is not None and block_size is None:
            raise ValueError("a drafter adapter drafts in block-diffusion mode: it needs block_size")
        if text_config is None or isinstance(text_config, dict):
            fields = dict(text_config or {})
            text_config = AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)
        # transformers' mask builders read `is_causal` from the decoder config; keep it derived from ours.
        text_config.is_causal = not bidirectional
        self.text_config = text_config
        self.mask_token_id = mask_token_id
        self.shift = shift
        self.bidirectional = bidirectional
        self.provenance = provenance
        self.block_size = block_size
        self.drafter = drafter
        kwargs["tie_word_embeddings"] = bool(getattr(text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)


__all__ = ["MaskedDiffusionConfig"]
