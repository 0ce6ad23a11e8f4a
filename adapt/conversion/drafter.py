"""The drafter adapter a `dlm-adapt convert --drafter` checkpoint starts with: its shape (`config.drafter`) and its
initial tensors, written beside the parent's untouched weights. The adapter itself, and what it does at inference,
is remote code: `model/drafter_masked_diffusion.py` (`DrafterAdapter`)."""

import torch
from transformers import AutoModelForCausalLM

from ..config import Names
from ..errors import AdaptError
from ..model.drafter_masked_diffusion import DESIGN, DrafterAdapter, drafter_targets

SEED = 0  # a conversion is reproducible: the same source gives the same adapter


def drafter_spec(text_config, rank: int, alpha: float | None = None, targets=None) -> dict:
    """`config.drafter` for this decoder: LoRA rank, alpha (default 2 x rank), the projections it acts on
    (`targets`: names, a list or comma-separated; default every one `drafter_targets` finds), and what its masks
    read (`DESIGN`: the parent's cache). A target name this decoder lacks is an error naming those it has."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(text_config)
    available = drafter_targets(skeleton)
    chosen = available if targets is None else sorted(set(Names(targets)))
    unknown = sorted(set(chosen) - set(available))
    if not chosen:
        raise AdaptError(f"drafter targets are empty: name projections among {', '.join(available)}, or leave them "
                         "unset")
    if unknown:
        raise AdaptError(f"drafter targets {', '.join(unknown)}: this model has no such projection; choose among "
                         f"{', '.join(available)}")
    return {"rank": rank, "alpha": 2 * rank if alpha is None else alpha, "targets": chosen, "reads": DESIGN}


def drafter_tensors(text_config, spec: dict, mask_token_id: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The untrained adapter's tensors under the names `MaskedDiffusionLM` gives them (`drafter.`...): LoRA A
    as peft starts it, B and the [MASK] row's delta zero, so it drafts as the block-diffusion conversion does."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(text_config)
    adapter = DrafterAdapter(skeleton, spec, mask_token_id)  # parameters on the CPU, hooks on the skeleton
    adapter.reset_parameters(torch.Generator().manual_seed(SEED))
    return {f"drafter.{name}": t.detach().to(dtype).contiguous() for name, t in adapter.state_dict().items()}
