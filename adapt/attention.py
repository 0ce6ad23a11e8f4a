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
    """Raise an AdaptError naming the fix when `name` is a FlashAttention that cannot run here. Other names (eager,
    sdpa, flex_attention, Hub kernels) are left to transformers."""
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
