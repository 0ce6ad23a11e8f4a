"""Keeping the parent's knowledge during adaptation (REFERENCE §15): the objective's extra terms beside the
masked-diffusion loss, each off at weight 0 (`ObjectiveConfig`).

- AR loss (`ar_loss_weight` λ; TiDAR, I-DLM, Nemotron): next-token cross-entropy of the clean sequence. In block
  diffusion the 2L layout's clean stream is it, when token-causal (`block.clean_attention: causal`): no extra
  forward, and the AR model the loss keeps is the one whose KV cache block decoding reads. Full-sequence: one
  more forward with the decoder's causal mask (`is_causal=True`).
  With `ar_target: parent` the term is KL(parent ‖ model) there instead, at every position: the parent's whole
  distribution, which a small training set cannot pull the AR mode away from.
- Distillation (`distill_weight` μ): KL(parent ‖ model) on the masked positions whose left context is clean (no
  masked token before them in their block, or in the row full-sequence), where the parent's causal prediction
  sees the same left context. The parent is the model with its adapter off (LoRA, QLoRA) or a frozen copy taken
  before the first step (full fine-tuning). The KL is `distill.kl_divergence`, as drafter training uses.
Both need shift: the logit at i − 1 is the one that predicts token i, in the model and in its causal parent.
[MASK] is never a clean token: it is removed from every distribution, as in the diffusion loss.
"""

import copy

import torch
import torch.nn.functional as F

from ..errors import AdaptError
from ..model.block_masked_diffusion import clean_attention_of
from .distill import distill_loss


def without_mask(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    logits = logits.float().clone()
    logits[..., mask_id] = -torch.inf
    return logits


def ar_loss(clean_logits, x0, maskable, mask_id: int) -> torch.Tensor:
    """Mean next-token cross-entropy: the logit at i − 1 predicts token i, over the maskable tokens from 1 on."""
    logits = without_mask(clean_logits[:, :-1], mask_id)
    ce = F.cross_entropy(logits.flatten(0, 1), x0[:, 1:].flatten(), reduction="none").view_as(x0[:, 1:])
    scored = maskable[:, 1:].float()
    return (ce * scored).sum() / scored.sum().clamp_min(1)


def ar_kl(clean_logits, parent_logits, maskable, mask_id: int) -> torch.Tensor:
    """Mean KL(parent ‖ model) of the next-token distributions at i − 1, over the maskable tokens i from 1 on."""
    return distill_loss(without_mask(clean_logits[:, :-1], mask_id), without_mask(parent_logits[:, :-1], mask_id),
                        "kl", valid=maskable[:, 1:])


def clean_left(masked: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """Masked positions with no masked position before them in their block (block_size None: in the row)."""
    rows, length = masked.shape
    size = length if block_size is None else block_size
    padded = F.pad(masked.long(), (0, -length % size)).view(rows, -1, size)
    before = (padded.cumsum(-1) - padded).view(rows, -1)[:, :length]  # masked positions before, in the block
    return masked & (before == 0)


def distill_term(student_logits, teacher_logits, masked, block_size: int | None, mask_id: int) -> torch.Tensor:
    """Mean KL(parent ‖ model) over the masked tokens i ≥ 1 with a clean left context; both logits at i − 1."""
    valid = clean_left(masked, block_size)[:, 1:]
    return distill_loss(without_mask(student_logits[:, :-1], mask_id), without_mask(teacher_logits[:, :-1], mask_id),
                        "kl", valid=valid)


class Retention:
    """The extra terms of one run: checks before training, the frozen parent, and the loss of a micro-step."""

    def __init__(self, recipe):
        cfg, dlm = recipe.cfg, recipe.dlm
        o = cfg.objective
        self.ar_weight, self.distill_weight, self.ar_target = o.ar_loss_weight, o.distill_weight, o.ar_target
        self.mask_id = dlm.config.mask_token_id
        blocks = recipe.checkpoint_block is not None or cfg.block.size is not None
        if cfg.block.clean_attention is not None:
            if not blocks:
                raise AdaptError("block.clean_attention is a block-diffusion option: set block.size")
            dlm.config.clean_attention = cfg.block.clean_attention  # OUTPUT/final decodes with it
        if (self.ar_weight or self.distill_weight) and not dlm.config.shift:
            raise AdaptError("objective.ar_loss_weight and distill_weight need shift (the logit at i − 1 predicts "
                             "token i, as in the causal parent): convert with model.shift=true")
        if self.ar_weight and blocks and clean_attention_of(dlm.config) != "causal":
            raise AdaptError("objective.ar_loss_weight in block diffusion reads the clean stream, which must be "
                             "token-causal: set block.clean_attention=causal")
        if o.position_masking and (not blocks or cfg.block.noise != "block"):
            raise AdaptError("objective.position_masking varies masking inside a block: it needs block diffusion "
                             "(block.size) with block.noise=block")
        if o.position_masking and o.complementary:
            raise AdaptError("objective.position_masking with complementary masks: the complement of a mask that "
                             "favours late positions favours early ones, cancelling it; set one of them off")
        self.clean_stream = bool(self.ar_weight) and blocks
        self.needs_parent = bool(self.distill_weight) or self.ar_target == "parent"
        self.frozen = None
        if self.needs_parent:
            if cfg.train.method == "full":
                if recipe.world > 1:
                    raise AdaptError("objective.distill_weight and ar_target=parent with full fine-tuning keep a "
                                     "frozen copy of the parent in one process: use train.method=lora, or launch "
                                     "one process")
                self.frozen = copy.deepcopy(dlm).eval().requires_grad_(False)
            elif not hasattr(recipe.model, "disable_adapter"):
                raise AdaptError("objective.distill_weight and ar_target=parent need the parent: a LoRA adapter or "
                                 "full fine-tuning")

    @property
    def enabled(self) -> bool:
        return bool(self.ar_weight or self.distill_weight)

    @torch.no_grad()
    def parent_logits(self, recipe, x0, padding):
        """The parent's causal logits on the clean rows: the frozen copy, or the model with its adapter off."""
        model = recipe.accelerator.unwrap_model(recipe.model)
        if self.frozen is not None:
            if next(self.frozen.parameters()).device != x0.device:  # copied before Accelerate moved the model
                self.frozen.to(x0.device)
            return self.frozen(input_ids=x0, attention_mask=padding, is_causal=True).logits
        with model.disable_adapter():
            return recipe.dlm(input_ids=x0, attention_mask=padding, is_causal=True).logits

    def loss(self, recipe, logits, clean_logits, x0, masked, maskable, padding, first: int = 0):
        """(λ·AR + μ·KL, the terms as floats for the log) of one micro-batch. `logits` are the model's from column
        `first` on (SFT skips the prompts); the other tensors cover every column. Rows doubled by complementary
        masks share their clean half."""
        rows = padding.shape[0] if not recipe.cfg.objective.complementary else padding.shape[0] // 2
        x, pad, scored = x0[:rows], padding[:rows], maskable[:rows]
        total, terms = logits.new_zeros((), dtype=torch.float32), {}
        parent = self.parent_logits(recipe, x, pad) if self.needs_parent else None
        if self.ar_weight:
            if clean_logits is None:  # full-sequence: the causal forward, through the wrapper (gradients)
                clean_logits = recipe.model(input_ids=x, attention_mask=pad, is_causal=True).logits
            if self.ar_target == "parent":
                term, name = ar_kl(clean_logits[:rows], parent, scored, self.mask_id), "ar_kl"
            else:
                term, name = ar_loss(clean_logits[:rows], x, scored, self.mask_id), "ar_loss"
            total, terms[name] = total + self.ar_weight * term, float(term.detach())
        if self.distill_weight:
            teacher = parent[:, first:].repeat(logits.shape[0] // rows, 1, 1)
            term = distill_term(logits, teacher, masked[:, first:], recipe.block, self.mask_id)
            total, terms["distill_kl"] = total + self.distill_weight * term, float(term.detach())
        return total, terms

