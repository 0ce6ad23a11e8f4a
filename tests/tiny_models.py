"""The architecture case table: one tiny random model per supported `model_type` (2 layers, hidden 32),
plus a tiny word-level tokenizer, all built in-process."""

import copy

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

WORDS = 96  # tokenizer: 4 specials + 96 words = 100 tokens
SPECIALS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)
_common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, **IDS)

# sliding_window=8 with sequences of 12: sliding layers really cut the window, and position 0 still
# reaches position 6 inside one layer
ARCH_CONFIGS = {
    "llama": lambda v: LlamaConfig(vocab_size=v, **_common),
    "mistral": lambda v: MistralConfig(vocab_size=v, sliding_window=8, head_dim=8, **_common),
    "qwen2": lambda v: Qwen2Config(vocab_size=v, use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                   **_common),
    "qwen3": lambda v: Qwen3Config(vocab_size=v, use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                   head_dim=8, **_common),
    "qwen3_moe": lambda v: Qwen3MoeConfig(vocab_size=v, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=32, **_common),
    "gemma2": lambda v: Gemma2Config(vocab_size=v, head_dim=8, sliding_window=8, **_common),
    "gemma3_text": lambda v: Gemma3TextConfig(vocab_size=v, head_dim=8, sliding_window=8,
                                              layer_types=["sliding_attention", "full_attention"], **_common),
    "phi3": lambda v: Phi3Config(vocab_size=v, sliding_window=8, **_common),
    "gpt2": lambda v: GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=64, **IDS),
    "olmo2": lambda v: Olmo2Config(vocab_size=v, **_common),
}
ARCHS = sorted(ARCH_CONFIGS)


def tiny_config(arch: str, vocab_size: int = WORDS + len(SPECIALS), tie: bool | None = None):
    config = ARCH_CONFIGS[arch](vocab_size)
    if tie is not None:
        config.tie_word_embeddings = tie
    return config


def layer_type_variants(config):
    """One config per attention layer type, with every layer of that type (so a test of a property holds for
    each type, not just for the model as a whole)."""
    types = sorted(set(getattr(config, "layer_types", None) or []))
    if len(types) <= 1:
        return {types[0] if types else "all": config}
    variants = {}
    for t in types:
        c = copy.deepcopy(config)
        c.layer_types = [t] * c.num_hidden_layers
        variants[t] = c
    return variants


def tiny_tokenizer(mask_token: bool = False, pad_token: bool = True) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"mask_token": "<mask>"} if mask_token else {}
    if mask_token:
        tok.add_special_tokens(["<mask>"])
    if pad_token:
        extra["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   **extra)


def save_tiny_source(path, arch: str, vocab_size: int | None = None, tie: bool | None = None,
                     mask_token: bool = False, seed: int = 0, pad_token: bool = True, **save_kwargs):
    """A causal source checkpoint directory (safetensors + tokenizer). Returns the causal model (eval)."""
    tokenizer = tiny_tokenizer(mask_token, pad_token)
    config = tiny_config(arch, vocab_size or len(tokenizer), tie)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path, **save_kwargs)
    tokenizer.save_pretrained(path)
    return model


TINY_CHAT_TEMPLATE = ("{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}"
                      "{% if add_generation_prompt %}w3{% endif %}")


def with_chat_template(source, path, template: str = TINY_CHAT_TEMPLATE):
    """A copy of the causal source directory `source` at `path` whose tokenizer has `template` as its chat
    template (the tiny tokenizer has none). Returns `path`."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(source, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    return path


def write_word_runs(path, count: int, seed: int = 0):
    """A training text of `count` documents with learnable structure: runs of 8-15 consecutive vocabulary words
    (w4 .. w94), blank-line separated. The same `seed` gives the same text."""
    import random

    rng = random.Random(seed)
    docs = [" ".join(f"w{i}" for i in range(s, s + rng.randrange(8, 16))) for s in
            (rng.randrange(4, 80) for _ in range(count))]
    path.write_text("\n\n".join(docs))
    return path
