# Written into every converted checkpoint as remote code: imports only torch and transformers.
"""Every transformers internal the diffusion model touches, each behind one small function.

transformers renames things between minor releases (5.24: `past_key_values` became `cache` in model outputs and
forward arguments). The rest of the remote code uses only public classes and these functions, so a rename is
fixed here once, and `tests/test_transformers_compat.py` checks each function on the oldest and latest supported
releases. Each function looks up what the installed transformers offers instead of comparing version numbers.
"""

import dataclasses
import inspect

import torch
from transformers import PreTrainedModel

# The dlm-adapt release that wrote this code, and the transformers releases it was tested on. A checkpoint whose
# code fails on a newer transformers is fixed by `pip install -U dlm-adapt; dlm-adapt upgrade DIR`.
DLM_ADAPT_VERSION = "0.2.0"
TESTED_TRANSFORMERS = ("5.10.0", "5.24.0")
CACHE_NAMES = ("cache", "past_key_values")  # newest first


def cache_kwarg(forward) -> str:
    """The name under which `forward` takes a KV cache (`cache` since transformers 5.24, `past_key_values` before)."""
    params = inspect.signature(forward).parameters
    return next((name for name in CACHE_NAMES if name in params), CACHE_NAMES[-1])


def output_cache(output):
    """The KV cache held by a model output, whatever this transformers calls the field (None if there is none)."""
    names = {f.name for f in dataclasses.fields(output)} if dataclasses.is_dataclass(output) else set(output.keys())
    return next((getattr(output, name) for name in CACHE_NAMES if name in names), None)


def decoder_class(text_config):
    """The causal-LM class transformers builds for `text_config` (to read its attention-support flags)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(text_config)]


def set_causal(decoder, causal: bool):
    """Switch a decoder between causal and bidirectional attention: the config flag the mask builders read, and each
    attention module's `is_causal` flag, which SDPA/flash kernels read when no mask tensor is built."""
    decoder.config.is_causal = causal
    for module in decoder.modules():
        if isinstance(getattr(module, "is_causal", None), bool) and not isinstance(module, PreTrainedModel):
            module.is_causal = causal


def select_cache_positions(cache, index: torch.Tensor):
    """Keep only the cached keys/values at sequence positions `index` (in that order), in every layer."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, index], layer.values[:, :, index]


def drop_last_cached(cache, n: int):
    """Remove the last `n` positions from every layer of a cache (a negative `crop` means this in every 5.x)."""
    cache.crop(-n)


def causal_mask(builder, **kwargs):
    """Call one of `transformers.masking_utils`' mask builders with no cache, under this release's argument name."""
    kwargs[cache_kwarg(builder)] = None
    return builder(**kwargs)


__all__ = ["DLM_ADAPT_VERSION", "TESTED_TRANSFORMERS", "cache_kwarg", "causal_mask", "decoder_class",
           "drop_last_cached", "output_cache", "select_cache_positions", "set_causal"]
