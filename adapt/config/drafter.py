"""The drafter sections of a training recipe: `drafter:` (distilling the frozen parent into a drafter checkpoint's
adapter, REFERENCE §14) and `data.generate:` (the parent's own continuations of training-text prompts as the
training text). The training modules that act on them are `adapt.training.drafter_training` and
`adapt.training.distill` (the losses)."""

from dataclasses import dataclass
from typing import Literal

from ..ranges import FieldError, check_ranges


@dataclass
class DrafterConfig:
    """Drafter training (`drafter:` in a recipe). With `enabled`, `dlm-adapt train` trains only the drafter adapter
    of a drafter checkpoint (`model.drafter`: LoRA pairs and the [MASK]-row delta) by distillation from the frozen
    parent (the same checkpoint, adapter off, causal); the parent's weights reach OUTPUT/final byte for byte. The
    draft length is the block size: `block.size` (and `block.schedule`, a draft-length curriculum), else the
    checkpoint's."""

    enabled: bool = False
    loss: Literal["tv", "kl", "ce"] = "tv"
    """At every drafted position, between the parent's next-token distribution p and the drafter's q: `tv`, total
    variation 1 − Σ min(p, q) (= 1 − the probability that speculative sampling keeps the draft, Uno); `kl`,
    KL(p‖q); `ce`, cross-entropy of q on the parent's argmax (what greedy verification checks)."""
    temperature: float = 1.0
    """The sampling temperature at which p and q are compared (`tv`, `kl`, and validation's `val_acceptance`): both
    logits divided by it. Greedy decoding (temperature 0) accepts a draft when argmax q = argmax p, which validation
    reports as `val_greedy_acceptance`; TV at temperature 0 has no gradient, so the loss takes a positive one."""
    groups: int | None = None
    """Draft groups per training row: each drafts `draft length` tokens from the clean tokens before a random cut.
    None: the row is covered (cuts every draft length from a random offset, about L / draft length groups)."""
    rank: int = 16
    """The adapter's LoRA rank when `model.path` is a causal source, converted with `--drafter` by the run (the
    parent stored in `model.dtype`); a drafter checkpoint keeps its own rank, alpha and targets, and its parent's
    dtype must be `model.dtype` (the parent reaches OUTPUT/final byte for byte)."""
    alpha: float | None = None
    """The LoRA alpha of that conversion (the update is scaled by alpha / rank); None: 2 x rank."""
    targets: list[str] | None = None
    """The projections that conversion's LoRA acts on, e.g. [gate_proj, up_proj, down_proj]; None: every linear
    layer but the LM head and MoE routers. Fewer targets make each drafting forward cheaper (the adapter's gated
    products run per targeted projection)."""

    def convert_options(self) -> dict:
        """The `adapt.convert` keywords of the adapter a causal source gets."""
        return {"drafter_rank": self.rank, "drafter_alpha": self.alpha, "drafter_targets": self.targets}

    def __post_init__(self):
        check_ranges(self, {"temperature": "(0, inf)", "groups": "[1, inf)", "rank": "[1, inf)", "alpha": "(0, inf)"})
        if self.targets is not None and not self.targets:
            raise FieldError("targets", "is empty: name projections, e.g. [q_proj, v_proj], or leave it unset")


@dataclass
class GenerateDataConfig:
    """Self-distillation data (`data.generate:`): before training, the parent (adapter off, causal, KV-cached
    batched `generate`) continues `prompts` prompts, the first `prompt_length` tokens of training documents, by
    `new_tokens` tokens; each prompt and its continuation is one training row (`data.seq_length` is not used).
    Validation rows are the parent's continuations of held-out documents' prompts (`data.max_eval_sequences` of them).
    Written to OUTPUT/self_distill.safetensors before the first step, so a resumed run reuses them."""

    prompts: int = 0
    """Number of training prompts (0: no generation, train on the text itself)."""
    prompt_length: int = 16
    new_tokens: int = 112
    """Tokens the parent writes per prompt; training and validation draft only inside them (from one past the first,
    as decoding does), so more than the longest draft length."""
    temperature: float = 0.0
    """0: greedy continuations (what greedy speculative decoding verifies); above 0, sampled ones."""
    batch_size: int = 256
    """Prompts per `generate` call (larger batches amortise its per-token overhead, which dominates small models)."""
    chat_message: str | None = None
    """A user message with `{text}` in it, e.g. "Continue this story:\n\n{text}": each prompt's text goes in its
    place, and the message is wrapped in the tokenizer's chat template (as `dlm-adapt generate --chat` does), so the
    drafter learns what the parent answers in a conversation. None: the prompts are the documents' tokens."""

    def __post_init__(self):
        check_ranges(self, {"prompts": "[0, inf)", "prompt_length": "[1, inf)", "new_tokens": "[1, inf)",
                            "temperature": "[0, inf)", "batch_size": "[1, inf)"})
        if self.chat_message is not None and "{text}" not in self.chat_message:
            raise FieldError("chat_message", f"must contain {{text}}, where each prompt's text goes "
                                                           f"(got {self.chat_message!r})")


def check_drafter_sections(drafter: DrafterConfig, data, method: str):
    """The cross-section rules of a drafter recipe, from `TrainConfig.__post_init__`."""
    generate = getattr(data, "generate", None)
    if generate is not None and generate.prompts and not drafter.enabled:
        raise FieldError("data.generate.prompts", "writes the parent's continuations for drafter training: set "
                                                  "drafter.enabled=true, or data.generate.prompts=0")
    if generate is not None and generate.prompts and data.separator is not None:
        raise FieldError("data.separator", "packs text, but drafter rows hold one prompt each "
                                           "(data.generate.prompts): unset it")
    if drafter.enabled and generate is None:
        raise FieldError("drafter.enabled", "trains on text with `dlm-adapt train`, not `dlm-adapt sft`")
    if drafter.enabled and method != "full":
        raise FieldError("train.method", f"must be full in a drafter run (got {method}): only the drafter adapter "
                                         "trains, the parent stays frozen (the adapter is itself a LoRA)")
