"""`adapt.load`: a converted checkpoint and its tokenizer, through the package's own classes (no remote code)."""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from .errors import AdaptError, first_line
from .sources import _HUB_ID, hub_access, unreachable_message
from .model import MaskedDiffusionConfig, MaskedDiffusionLM
from .upgrade import stale_code_warning


def load(path: str | Path, *, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
         attn_implementation: str | None = None, revision: str | None = None):
    """Load a dlm-adapt checkpoint (local directory or Hub id). Returns `(model, tokenizer)`, model in eval mode.

    `attn_implementation` is transformers' own switch (`eager`, `sdpa`, `flash_attention_2`, ...)."""
    local = Path(path).expanduser()
    if not local.exists() and not _HUB_ID.match(str(path)):
        raise AdaptError(f"model {path} does not exist (expected a dlm-adapt checkpoint directory or a Hub id)")
    if local.is_dir():
        config_file = local / "config.json"
        if not config_file.is_file():
            raise AdaptError(f"{local} has no config.json: not a model directory")
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except (ValueError, AttributeError) as e:
            raise AdaptError(f"{config_file} is not a JSON object ({first_line(e)}); the checkpoint is damaged: "
                             "convert or download it again") from e
        if model_type != MaskedDiffusionConfig.model_type:
            raise AdaptError(f"{local} is a '{model_type}' checkpoint, not a dlm-adapt diffusion checkpoint; "
                             f"convert it first: dlm-adapt convert {local} OUTPUT")
        stale = stale_code_warning(local)
        if stale:  # this package's own classes run it fine; transformers alone may not
            print(f"dlm-adapt: warning: {stale}", file=sys.stderr)
    kwargs = {"revision": revision} if revision else {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = load_model(path, attn_implementation, **kwargs)
    # explicit False: the checkpoint has auto_map, and the tokenizer needs no remote code; passing the config
    # spares AutoTokenizer a failing AutoConfig lookup of our model type (and its misleading warning)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, config=model.config,
                                              **({"revision": revision} if revision else {}), **hub_access(path))
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def load_model(path: str | Path, attn_implementation: str | None = None, **kwargs) -> MaskedDiffusionLM:
    """`MaskedDiffusionLM.from_pretrained` with its failures as one line: a missing or unreachable checkpoint, an
    attention implementation this machine cannot run."""
    access = hub_access(path)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return MaskedDiffusionLM.from_pretrained(str(path), **kwargs, **access)
    except OSError as e:  # a Hub id that is not there (or not reachable), missing weight files
        raise AdaptError(unreachable_message(str(path)) if access else f"cannot load model {path}: {first_line(e)}"
                         ) from e
    except (ImportError, ValueError) as e:
        if attn_implementation in (None, "eager", "sdpa"):
            raise
        raise AdaptError(f"attn_implementation '{attn_implementation}' cannot be used here ({first_line(e)}); use "
                         "sdpa or eager") from e
