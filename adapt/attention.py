"""Attention implementations this machine can run, checked from the name alone: a recipe or `adapt.load` that asks
for FlashAttention is refused before any data or weights load, in one line, whatever transformers would raise."""

import importlib.util

from .errors import AdaptError

# FlashAttention generation -> (the module its package installs, how to install it)
FLASH = {"2": ("flash_attn", "pip install flash-attn"),
         "3": ("flash_attn_interface", "install FlashAttention 3 (its hopper/ build)"),
         "4": ("flash_attn.cute", "install FlashAttention 4 (flash-attn's cute build)")}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def check_attn_implementation(name: str | None, key: str = "attn_implementation"):
    """Raise an AdaptError naming the fix when `name` is a FlashAttention or flex attention that cannot run here.
    Other names (eager, sdpa, Hub kernels) are left to transformers."""
    if name == "flex_attention":
        from transformers.utils import is_torch_flex_attn_available

        if not is_torch_flex_attn_available():
            import torch

            raise AdaptError(f"attn_implementation 'flex_attention' is not available here (torch {torch.__version__} "
                             f"has no flex attention; it needs torch >= 2.5): upgrade torch, or use {key}=sdpa "
                             f"(or eager)")
        return
    generation = (name or "").removeprefix("flash_attention_")
    if generation == (name or "") or generation not in FLASH:
        return
    import transformers.utils

    available = getattr(transformers.utils, f"is_flash_attn_{generation}_available", None)
    if available is None or available():  # a transformers without this check decides when it loads
        return
    module, install = FLASH[generation]
    why = ("flash-attn is not installed" if generation == "2" else f"FlashAttention {generation} is not installed") \
        if not _installed(module) else "it needs a CUDA GPU it supports"
    fix = f"{install}, or use {key}=sdpa" if not _installed(module) else f"use {key}=sdpa"
    raise AdaptError(f"attn_implementation '{name}' is not available here ({why}): {fix}")


def check_trains_here(name: str | None, device, key: str = "model.attn_implementation"):
    """Raise an AdaptError when `name` cannot run a backward pass on `device`: flex attention has none on CPU (torch
    refuses it up front). Asks torch itself, with a tiny forward that needs a gradient, so the refusal goes away
    with the torch release that adds one."""
    if name != "flex_attention":
        return
    import warnings

    import torch
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.zeros(1, 1, 16, 8, device=device, requires_grad=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "called without torch.compile": a probe, not the training kernel
            flex_attention(q, q, q)
    except NotImplementedError:
        kind = torch.device(device).type
        raise AdaptError(f"attn_implementation 'flex_attention' cannot train on {kind} (torch {torch.__version__} "
                         f"has no flex-attention backward there): train on a CUDA GPU, or use {key}=sdpa") from None
