"""The model side of training: loading the model to train (full, LoRA or QLoRA), the tokenizer read before any
conversion, learning-rate groups, and writing OUTPUT/final (merged or adapter-only)."""

import re
import shutil
from pathlib import Path

from transformers import AutoTokenizer

from .. import outputs
from ..config import DTYPES, TrainConfig
from ..errors import AdaptError, first_line
from ..checkpoint import DIFFUSION, detect, load_model
from ..model import MaskedDiffusionConfig, MaskedDiffusionLM
from ..model.transformers_compat import enable_activation_checkpointing
from ..sources import load_causal


def is_diffusion_checkpoint(path: str) -> bool:
    # anything else, even not a model at all, goes to the converter, which gives the precise error
    return detect(path).kind == DIFFUSION


def peft_model(model, lora_config):
    """`peft.get_peft_model`, without the FutureWarning transformers 5.25 prints when peft (0.21) reads the
    deprecated `is_gradient_checkpointing` of every model it wraps: not the user's business, and not theirs to fix."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, lora_config)


def load_for_training(cfg: TrainConfig, path: str):
    """The diffusion model at `path`, LoRA/QLoRA-wrapped if asked."""
    kwargs = {"dtype": DTYPES[cfg.model.dtype], "attn_implementation": cfg.model.attn_implementation}
    if cfg.train.method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except Exception as e:
            raise AdaptError(f"QLoRA needs a working bitsandbytes ({type(e).__name__}: {e}); "
                             "pip install bitsandbytes, or use train.method=lora") from e
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[cfg.model.dtype])
    model = load_model(path, **kwargs)
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.train.method in ("lora", "qlora"):
        from peft import LoraConfig, prepare_model_for_kbit_training

        if cfg.train.method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.model.gradient_checkpointing)
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=cfg.lora.target_modules,
                          trainable_token_indices=[model.config.mask_token_id] if cfg.lora.train_mask_token else None)
        try:
            model = peft_model(model, lora)
        except ValueError as e:
            raise AdaptError(f"LoRA target modules {cfg.lora.target_modules!r} do not fit this model: "
                             f"{str(e).splitlines()[0]}. Set lora.target_modules") from e
    return model


def diffusion_model(model) -> MaskedDiffusionLM:
    """The MaskedDiffusionLM inside Accelerate/PEFT wrappers."""
    while not isinstance(model, MaskedDiffusionLM):
        model = model.get_base_model() if hasattr(model, "get_base_model") else model.module
    return model


def param_groups(model, opt):
    """Attention and MLP parameters may get their own learning rates (RND1)."""
    groups = {"attention": [], "mlp": [], "other": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if re.search(r"\.(self_attn|attn|attention)\.", name):
            groups["attention"].append(p)
        elif re.search(r"\.(mlp|experts|feed_forward|block_sparse_moe)\.", name):
            groups["mlp"].append(p)
        else:
            groups["other"].append(p)
    lrs = {"attention": opt.attention_lr or opt.lr, "mlp": opt.mlp_lr or opt.lr, "other": opt.lr}
    return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


def source_tokenizer(cfg: TrainConfig, source: str, diffusion_source: bool):
    """The tokenizer and position limit of the model to train, read before any conversion. For a diffusion
    checkpoint this is the tokenizer training keeps; a causal source's is replaced by its converted one."""
    try:
        if diffusion_source:  # our config passed on: AutoConfig would need remote code for our model type
            config = MaskedDiffusionConfig.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, config=config)
            config = config.text_config
        else:
            causal = load_causal(source, gguf_file=cfg.model.gguf_file, weights=False)
            config, tokenizer = causal.config, causal.tokenizer
    except (OSError, ValueError, KeyError, AdaptError) as e:
        raise AdaptError(f"cannot load model.path={cfg.model.path}: {first_line(e)}") from e
    return tokenizer, getattr(config, "max_position_embeddings", None)


def save_final(cfg: TrainConfig, model, tokenizer, source: str, final: Path, check=None):
    """Write OUTPUT/final through a temporary sibling; `check(written)`, if given, may refuse it before it is
    renamed into place."""
    tmp = final.parent / ".final-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with outputs.write_errors(final):
            if cfg.train.method == "full":
                model.save_pretrained(tmp)
            elif cfg.lora.save_adapter_only:
                model.save_pretrained(tmp)  # a PEFT adapter: PeftModel.from_pretrained(base diffusion model, dir)
            else:
                if cfg.train.method == "qlora":  # merge into full-precision weights, not into the 4-bit ones
                    from peft import get_peft_model_state_dict, set_peft_model_state_dict

                    base = MaskedDiffusionLM.from_pretrained(source, dtype=DTYPES[cfg.model.dtype])
                    full = peft_model(base, model.peft_config["default"])
                    set_peft_model_state_dict(full, get_peft_model_state_dict(model))
                    model = full
                model.merge_and_unload().save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        if check:
            check(tmp)
    except AdaptError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
