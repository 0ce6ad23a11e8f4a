# Written into every converted checkpoint as remote code: imports only torch and transformers.
"""Every transformers internal the diffusion model touches, each behind one small function.

transformers renames things between minor releases (5.24: `past_key_values` became `cache` in model outputs and
forward arguments). The rest of the remote code uses only public classes and these functions, so a rename is
fixed here once, and `tests/test_transformers_compat.py` checks each function on the oldest and latest supported
releases. Each function looks up what the installed transformers offers; only the error hint compares versions.
"""

import contextlib
import dataclasses
import functools
import inspect
import re

import torch
from transformers import PreTrainedModel

# The dlm-adapt release that wrote this code, and the transformers releases it was tested on. A checkpoint whose
# code fails on a newer transformers is fixed by `pip install -U dlm-adapt; dlm-adapt upgrade DIR`. Adding a
# release: see "A new transformers release" in README.md.
DLM_ADAPT_VERSION = "0.8.0"
TESTED_TRANSFORMERS = ("5.5.0", "5.24.0", "5.25.0")  # oldest = pyproject's minimum; newest last
CACHE_NAMES = ("cache", "past_key_values")  # newest first

# What Python itself says when a call no longer matches the callee's signature: the mark of a renamed or removed
# keyword/argument. Errors transformers raises on purpose (about the user's setup) never read like this.
_SIGNATURE_DRIFT = re.compile(r"unexpected keyword argument|missing \d+ required (positional|keyword-only) argument|"
                              r"takes \d+ positional arguments? but|got multiple values for argument")


def _release(version: str) -> tuple[int, int, int]:
    parts = [int(part) for part in re.findall(r"\d+", version)[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def installed_transformers() -> str:
    import transformers

    return transformers.__version__


def newer_than_tested(version: str) -> bool:
    """Whether `version` is a minor release after the newest tested one (patch releases do not change APIs)."""
    return _release(version)[:2] > _release(TESTED_TRANSFORMERS[-1])[:2]


def is_api_drift(error: BaseException) -> bool:
    """Whether `error` looks like a transformers API the code uses having moved (a keyword, argument, attribute,
    module or name that is no longer there), as opposed to an error transformers raises on purpose about the user's
    setup (an attention implementation that is not installed, a bad config value), which must reach the user as
    it is."""
    if isinstance(error, NameError):
        return True
    if isinstance(error, TypeError):
        return bool(_SIGNATURE_DRIFT.search(str(error)))
    if isinstance(error, AttributeError):  # Python's own lookup failure sets `.name`; `raise AttributeError(msg)` not
        return getattr(error, "name", None) is not None or "has no attribute" in str(error)
    if isinstance(error, ModuleNotFoundError):
        return (error.name or "").split(".")[0] == "transformers"
    if isinstance(error, ImportError):
        return "cannot import name" in str(error)
    return False


@contextlib.contextmanager
def explain_newer_transformers():
    """On a transformers newer than any this code was tested on, an error that looks like API drift (see
    `is_api_drift`) gains one line that says how to update the checkpoint's code. Every other error passes through
    unchanged."""
    try:
        yield
    except (TypeError, AttributeError, ImportError, NameError) as error:
        installed = installed_transformers()
        if not newer_than_tested(installed) or not is_api_drift(error):
            raise
        raise RuntimeError(
            f"this checkpoint's code (written by dlm-adapt {DLM_ADAPT_VERSION}, tested up to transformers "
            f"{TESTED_TRANSFORMERS[-1]}) failed on transformers {installed}, probably because "
            f"transformers changed an API it uses. Update the code in place: pip install -U dlm-adapt && "
            f"dlm-adapt upgrade CHECKPOINT_DIR (or install transformers<={TESTED_TRANSFORMERS[-1]}). "
            f"Original error: {type(error).__name__}: {error}"
        ) from error


@functools.lru_cache(maxsize=None)  # called on every forward pass: read each signature once
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


def attention_support_flags() -> list[str]:
    """The boolean `_supports_*` class flags this transformers reads to pick an attention implementation (their
    names and number change between releases)."""
    return sorted(name for name in dir(PreTrainedModel)
                  if name.startswith("_supports_") and isinstance(getattr(PreTrainedModel, name), bool))


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


def select_cache_rows(cache, rows: torch.Tensor):
    """Keep only the batch rows `rows` (indices, in that order) of a cache, in every layer."""
    for layer in cache.layers:
        if layer.keys is not None and layer.keys.numel():
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]


def drop_last_cached(cache, n: int):
    """Remove the last `n` positions from every layer of a cache (a negative `crop` means this in every 5.x)."""
    if n > 0:  # crop(-0) would empty it
        cache.crop(-n)


def enable_activation_checkpointing(model):
    """Recompute each decoder layer's activations during backward instead of storing them (non-reentrant).
    transformers 5.24 renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable`; the old name
    warns there and goes in v6."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointing_drops_cache(model) -> bool:
    """Whether a forward of `model` now would run its layers under activation checkpointing, which drops a given KV
    cache (transformers' `GradientCheckpointingLayer`: the backward's recompute would otherwise append to it twice)."""
    return model.training and torch.is_grad_enabled() and any(
        getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def full_cache():
    """An empty KV cache whose every layer keeps every position, sliding-window layers included (the attention
    mask, not the cache, then applies the window; `DynamicCache(config=...)` would trim sliding layers)."""
    from transformers import DynamicCache

    return DynamicCache()


def causal_mask(builder, **kwargs):
    """Call one of `transformers.masking_utils`' mask builders with no cache, under this release's argument name.
    `allow_is_causal_skip=False` goes only to builders that take it: older ones already never skip building the
    mask when given an `or_mask_function`, which is the only way this package calls them."""
    kwargs[cache_kwarg(builder)] = None
    if "allow_is_causal_skip" not in inspect.signature(builder).parameters:
        assert kwargs.pop("allow_is_causal_skip", False) is False and kwargs.get("or_mask_function") is not None
    return builder(**kwargs)


def bidirectional_mask(**kwargs):
    """Call `transformers.masking_utils.create_bidirectional_mask` with no cache, under this release's argument
    name. Only ever called with an `and_mask_function`, which makes every 5.x release build the mask (no skip)."""
    from transformers.masking_utils import create_bidirectional_mask

    assert kwargs.get("and_mask_function") is not None
    kwargs[cache_kwarg(create_bidirectional_mask)] = None
    return create_bidirectional_mask(**kwargs)


__all__ = ["DLM_ADAPT_VERSION", "TESTED_TRANSFORMERS", "attention_support_flags", "bidirectional_mask", "cache_kwarg",
           "checkpointing_drops_cache",
           "causal_mask", "decoder_class", "drop_last_cached", "explain_newer_transformers", "full_cache",
           "is_api_drift", "newer_than_tested", "output_cache", "select_cache_positions", "set_causal"]
