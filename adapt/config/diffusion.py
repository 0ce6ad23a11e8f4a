"""The diffusion sections of a training recipe: `objective:` (the loss), `anneal:` (attention-mask annealing) and
`block:` (block diffusion and its block-size schedule). The training modules that act on them are
`adapt.training.objective`, `adapt.training.annealing` and `adapt.training.blocks`."""

from dataclasses import dataclass, field
from typing import Literal

from ..ranges import FieldError, check_ranges


@dataclass
class ObjectiveConfig:
    """Options of the masked-diffusion loss."""

    eps: float = 1e-3
    """Smallest t: t = (1 − eps)·u + eps."""
    t_sampling: Literal["iid", "antithetic"] = "iid"
    """`antithetic`: low-discrepancy t across the batch, t_i from (u + i/B) mod 1 (MDLM); lower variance."""
    normalization: Literal["masked", "all", "sequence"] = "masked"
    """Divide the weighted loss sum by the masked tokens in the batch (DiffuLLaMA), by all maskable tokens
    (LLaDA: an unbiased per-token ELBO), or per sequence by its maskable tokens, then average (LLaDA SFT)."""
    weighting: Literal["inverse_t", "cart"] = "inverse_t"
    """`inverse_t`: the ELBO weight 1/t. `cart` (Dream): weight a masked token by ½ Σ over clean positions i of
    p(1 − p)^(|n − i| − 1), favouring tokens with clean neighbours."""
    cart_p: float = 0.3
    complementary: bool = False
    """Also train on the complement mask of every sequence (Fast-dLLM v2): every maskable token is supervised
    once per step; the batch is doubled."""
    ar_loss_weight: float = 0.0
    """λ: add λ × the next-token cross-entropy of the clean sequence (TiDAR, I-DLM, Nemotron), so the model keeps
    its parent's AR skill. Block diffusion: read from the 2L layout's clean stream, which must be token-causal
    (`block.clean_attention: causal`); full-sequence: one more forward with the causal mask. Needs shift. 0: off."""
    ar_target: Literal["data", "parent"] = "data"
    """What the AR term fits: `data`, the next token of the text (cross-entropy); `parent`, the parent's whole
    next-token distribution at every position, KL(parent ‖ model), so the AR mode is held to its parent's and
    never fits the training text beyond it (the parent as for `distill_weight`: one forward serves both)."""
    position_masking: float = 0.0
    """c ≥ 0 (block diffusion): later positions of a block are masked more often (Efficient-DLM). Position j of a
    block of B is masked with probability t^γ_j, γ_j = exp(c·(½ − j/(B−1))), and weighted γ_j / t: the ELBO of
    that per-token schedule, an unbiased estimate of an upper bound on the NLL (not the uniform schedule's bound,
    which validation and `dlm-adapt eval` keep reporting). Not with `complementary` (the complement would favour
    early positions). 0: every position masked with probability t."""
    distill_weight: float = 0.0
    """μ: add μ × KL(parent ‖ model) on masked positions whose left context is clean (no masked token before them
    in their block; full-sequence: in the row), where the parent's causal prediction has the same context. The
    parent: the model with its adapter off (LoRA, QLoRA), or a frozen copy taken before the first step (full
    fine-tuning: twice the weights in memory). 0: off."""

    def __post_init__(self):
        check_ranges(self, {"eps": "(0, 1)", "cart_p": "(0, 1)", "ar_loss_weight": "[0, inf)",
                            "position_masking": "[0, inf)", "distill_weight": "[0, inf)"})
        if self.ar_target == "parent" and not self.ar_loss_weight:
            raise FieldError("ar_target", "is parent, but the AR term it shapes is off: set "
                                          "objective.ar_loss_weight above 0")


@dataclass
class AnnealConfig:
    """Attention-mask annealing from causal to bidirectional."""

    mode: Literal["diffullama", "none"] = "diffullama"
    """`diffullama`: random future visibility with probability = mask ratio; `none`: bidirectional from step 0."""
    anneal_steps: int = 1000
    """Optimizer steps until the mask ratio reaches 1."""
    schedule: Literal["linear", "cosine"] = "linear"
    """Ratio over steps: linear r = min(1, (step + 1)/anneal_steps), or a cosine ramp over the same steps."""

    def __post_init__(self):
        check_ranges(self, {"anneal_steps": "[1, inf)"})


@dataclass
class BlockConfig:
    """Block diffusion in training (`block:` in a recipe)."""

    size: int | None = None
    """Block size B. None: the checkpoint's (a full-sequence checkpoint trains as today). A causal source is
    converted with this block size."""
    schedule: list[int] = field(default_factory=list)
    """Warmup from AR to blocks (LLaDA 2.0's warmup–stable–decay): the block sizes of successive stages, e.g.
    [1, 4, 16], each trained for `stage_steps` optimizer steps; the last is `size` and lasts until the decay.
    Empty: `size` from the first step."""
    stage_steps: int = 0
    """Optimizer steps of each warmup stage but the last."""
    decay_to: int | None = None
    """Serving block size for the last `decay_steps` steps (it becomes the checkpoint's block size). None: none."""
    decay_steps: int = 0
    noise: Literal["block", "sequence"] = "block"
    """`block`: one t per block, stratified across a row's blocks (a shifted lattice, as MDLM's antithetic t);
    `sequence`: one t per row, as in full-sequence training."""
    clean_attention: Literal["block", "causal"] | None = None
    """How the clean tokens of the 2L layout attend inside their own block: `block` (both ways, BD3-LM) or
    `causal` (token-causal: the clean stream is then exactly an AR model, the parent at step 0, and block
    decoding's KV cache is that AR model's). Stored in the checkpoint (`config.clean_attention`). None: the
    checkpoint's (a causal source: block)."""

    def __post_init__(self):
        check_ranges(self, {"size": "[1, inf)", "schedule": "[1, inf)", "stage_steps": "[0, inf)",
                            "decay_to": "[1, inf)", "decay_steps": "[0, inf)"})
        if self.schedule and self.size is None:
            raise FieldError("schedule", "needs block.size, the block size it ends at")
        if self.schedule and self.schedule[-1] != self.size:
            raise FieldError("schedule", f"must end at block.size ({self.size}), got {self.schedule}; "
                                         f"append {self.size}")
        if len(self.schedule) > 1 and self.stage_steps < 1:
            raise FieldError("stage_steps", "must be at least 1 when block.schedule has several stages")
        if self.decay_to is not None and (self.size is None or self.decay_steps < 1):
            raise FieldError("decay_to", "needs block.size and block.decay_steps >= 1")

    def size_at(self, step: int, max_steps: int, checkpoint_size: int | None) -> int | None:
        """The block size trained at optimizer step `step` (0-based) of `max_steps`."""
        if self.decay_to is not None and step >= max_steps - self.decay_steps:
            return self.decay_to
        if self.schedule:
            return self.schedule[min(step // max(self.stage_steps, 1), len(self.schedule) - 1)]
        return self.size if self.size is not None else checkpoint_size

    def largest(self, checkpoint_size: int | None) -> int | None:
        """The largest block size any step trains."""
        sizes = [*self.schedule, self.size if self.size is not None else checkpoint_size, self.decay_to]
        return max((s for s in sizes if s is not None), default=None)

    def final_size(self, checkpoint_size: int | None) -> int | None:
        """The block size the trained model decodes with."""
        if self.decay_to is not None:
            return self.decay_to
        return self.size if self.size is not None else checkpoint_size
