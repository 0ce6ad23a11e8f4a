"""The one seam between dlm-adapt and its checkpoints (in the spirit of litgpt's api.py): what a path holds
(`detect`), loading a diffusion checkpoint (`load`, `load_model`; `adapt.load`), checking that one loads with
transformers alone (`validate`, `validate_adapter`), and writing its remote code (`write_remote_code`).

Every command asks here rather than reading config.json itself: `generate`/`load`, `eval` (a diffusion or a causal
model), `train` (convert the source first or not) and `push` (what to validate). The remote-code writer itself
lives in `model/`, because a checkpoint's own `save_pretrained` runs under transformers alone and cannot import
this package; it is re-exported here so the rest of dlm-adapt has one place to look.
"""

import json
import math
import sys
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import check_attn_implementation
from .errors import AdaptError, first_line
from .model import CODE_FILES, MaskedDiffusionConfig, MaskedDiffusionLM, remote_code_fields, write_remote_code
from .model.drafter_masked_diffusion import DrafterError
from .sources import _HUB_ID, hub_access, unreachable_message

DIFFUSION = "diffusion"  # a dlm-adapt checkpoint: config.json of model_type masked_diffusion_lm
CAUSAL = "causal"  # any other model config.json (or a GGUF file): something to convert or compare against
ADAPTER = "adapter"  # a PEFT adapter directory (adapter_config.json, no config.json)
TRAINING_STATE = "training-state"  # OUTPUT/checkpoints/step-N: resumable state, not a model
# the files of a training-state directory, written by `adapt.training.training_state`; the first marks one
TRAINING_STATE_FILES = ("state.json", "trainable.safetensors", "optimizer.pt", "scheduler.pt")
NOT_A_MODEL = "not-a-model"
MODEL_TYPE = MaskedDiffusionConfig.model_type
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class Detected:
    """What `detect` found, from config files alone (no weights read)."""

    kind: str
    path: str  # the directory or Hub id (for a GGUF file, the directory holding it)
    gguf_file: str | None = None
    config: dict | None = None  # config.json, when it was read
    has_config: bool = False  # a local config.json exists (readable or not)
    adapter: bool = False  # adapter_config.json is there too (or instead)
    error: Exception | None = None  # why config.json (local, or of a Hub id) could not be read

    @property
    def model_type(self) -> str | None:
        return (self.config or {}).get("model_type")


def detect(path: str | Path) -> Detected:
    """What `path` is: a diffusion checkpoint, another (causal) model, a PEFT adapter, a training checkpoint, or
    none of these. A name that is not a local path but could be a Hub id is answered by its config.json on the
    Hub (from the cache alone when the Hub cannot be reached)."""
    local = Path(path).expanduser()
    if local.is_file():
        if local.suffix == ".gguf":
            return Detected(CAUSAL, str(local.parent), gguf_file=local.name)
        return Detected(NOT_A_MODEL, str(local))
    if local.is_dir():
        return _detect_directory(local)
    if local.exists() or not _HUB_ID.match(str(path)) or local.suffix == ".gguf":
        return Detected(NOT_A_MODEL, str(path))
    from transformers import PreTrainedConfig

    try:
        config, _ = PreTrainedConfig.get_config_dict(str(path), **hub_access(path))
    except Exception as e:  # missing repo, no network, bad id: all mean "no model config to be had"
        return Detected(NOT_A_MODEL, str(path), error=e)
    return Detected(DIFFUSION if config.get("model_type") == MODEL_TYPE else CAUSAL, str(path), config=config)


def _detect_directory(directory: Path) -> Detected:
    adapter = (directory / "adapter_config.json").is_file()
    config_file = directory / "config.json"
    if not config_file.is_file():
        kind = ADAPTER if adapter else TRAINING_STATE if (directory / TRAINING_STATE_FILES[0]).is_file() else NOT_A_MODEL
        return Detected(kind, str(directory), adapter=adapter)
    try:
        config = json.loads(config_file.read_text())
        if not isinstance(config, dict):
            raise ValueError(f"a JSON {type(config).__name__}, not an object")
    except (OSError, ValueError) as e:
        return Detected(NOT_A_MODEL, str(directory), has_config=True, adapter=adapter, error=e)
    kind = DIFFUSION if config.get("model_type") == MODEL_TYPE else CAUSAL
    return Detected(kind, str(directory), config=config, has_config=True, adapter=adapter)


def is_diffusion_model(model) -> bool:
    """Whether a loaded model (ours, or anything with a transformers config) is a diffusion model."""
    return getattr(getattr(model, "config", None), "model_type", None) == MODEL_TYPE


# ---------------------------------------------------------------- loading


def load(path: str | Path, *, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
         attn_implementation: str | None = None, revision: str | None = None):
    """Load a dlm-adapt checkpoint (local directory or Hub id). Returns `(model, tokenizer)`, model in eval mode.

    `attn_implementation` is transformers' own switch (`eager`, `sdpa`, `flash_attention_2`, ...)."""
    from transformers import AutoTokenizer

    check_attn_implementation(attn_implementation)
    local = Path(path).expanduser()
    if not local.exists() and not _HUB_ID.match(str(path)):
        raise AdaptError(f"model {path} does not exist (expected a dlm-adapt checkpoint directory or a Hub id)")
    if local.is_dir():
        found = detect(local)
        config_file = local / "config.json"
        if not found.has_config:
            raise AdaptError(f"{local} has no config.json: not a model directory")
        if found.error is not None:
            raise AdaptError(f"{config_file} is not a JSON object ({first_line(found.error)}); the checkpoint is "
                             "damaged: convert or download it again") from found.error
        if found.kind != DIFFUSION:
            raise AdaptError(f"{local} is a '{found.model_type}' checkpoint, not a dlm-adapt diffusion checkpoint; "
                             f"convert it first: dlm-adapt convert {local} OUTPUT")
        stale = stale_code_warning(local)
        if stale:  # this package's own classes run it fine; transformers alone may not
            print(f"dlm-adapt: warning: {stale}", file=sys.stderr)
    kwargs = {"revision": revision} if revision else {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    revision_kw = {"revision": revision} if revision else {}
    # the tokenizer first: a checkpoint without one fails before its weights load. Explicit False: the checkpoint
    # has auto_map, and the tokenizer needs no remote code; passing the config spares AutoTokenizer a failing
    # AutoConfig lookup of our model type (and its misleading warning)
    try:
        config = MaskedDiffusionConfig.from_pretrained(str(path), **revision_kw, **hub_access(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, config=config, **revision_kw,
                                                  **hub_access(path))
    except (OSError, ValueError, ImportError) as e:  # a missing tokenizer: five lines (5.5.0: a protobuf ImportError)
        if hub_access(path):
            raise AdaptError(unreachable_message(str(path))) from e
        raise AdaptError(f"cannot load the tokenizer of {path} ({first_line(e)}); the checkpoint's tokenizer files "
                         "are missing or damaged: convert or download it again") from e
    model = load_model(path, attn_implementation, config=config, **kwargs)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def load_model(path: str | Path, attn_implementation: str | None = None, **kwargs) -> MaskedDiffusionLM:
    """`MaskedDiffusionLM.from_pretrained` with its failures as one line: a missing or unreachable checkpoint, an
    attention implementation this machine cannot run."""
    check_attn_implementation(attn_implementation)
    access = hub_access(path)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return MaskedDiffusionLM.from_pretrained(str(path), **kwargs, **access)
    except OSError as e:  # a Hub id that is not there (or not reachable), missing weight files
        raise AdaptError(unreachable_message(str(path)) if access else f"cannot load model {path}: {first_line(e)}"
                         ) from e
    except DrafterError as e:  # a drafter of a design this code does not run
        raise AdaptError(f"{path}: {e}") from e
    except Exception as e:
        if type(e).__name__ == "SafetensorError":  # a weight file cut short or overwritten
            raise AdaptError(f"the weights of {path} are corrupt or truncated ({first_line(e)}); convert or "
                             "download the checkpoint again") from e
        if not isinstance(e, (ImportError, ValueError)) or attn_implementation in (None, "eager", "sdpa"):
            raise
        raise AdaptError(f"attn_implementation '{attn_implementation}' cannot be used here ({first_line(e)}); use "
                         "sdpa or eager") from e


# ---------------------------------------------------------------- validation (transformers alone)


class NotDiffusionError(AdaptError):
    """config.json describes some other model type."""


@dataclass
class Validated:
    """A checkpoint `validate` found loadable with transformers alone, and the facts a model card states."""

    directory: Path
    config: dict  # config.json as stored
    mask_token: str
    parameters: int
    dtype: str | None
    generation: dict
    license_files: list[str]


def validate(directory: Path) -> Validated:
    """Everything `AutoModel.from_pretrained(directory, trust_remote_code=True)` needs, checked without loading the
    weights: config, remote code, safetensors headers against the model's parameters, tokenizer (its mask token
    is the config's), generation config."""
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    found = detect(directory)
    if found.error is not None:
        raise AdaptError(f"{directory}/config.json is not readable JSON: {first_line(found.error)}") from found.error
    raw = found.config
    if found.kind != DIFFUSION:
        raise NotDiffusionError(f"{directory} is a '{found.model_type}' checkpoint, not a dlm-adapt diffusion "
                                f"checkpoint (config.json model_type must be {MODEL_TYPE}); convert it first: "
                                f"dlm-adapt convert {directory} OUTPUT")
    auto_map = raw.get("auto_map") or {}
    if "AutoModel" not in auto_map:
        raise AdaptError(f"{directory}/config.json has no auto_map for AutoModel: it would not load with transformers "
                         "alone; re-save it with model.save_pretrained")
    needed = set(CODE_FILES) | {v.split("--")[-1].split(".")[0] + ".py" for v in auto_map.values()}
    for name in sorted(needed):
        path = directory / name
        if not path.is_file():
            raise AdaptError(f"{directory} lacks the remote code file {name}: it would not load with transformers "
                             f"alone; add it with: dlm-adapt upgrade {directory}")
        try:
            compile(path.read_text(), str(path), "exec")
        except (SyntaxError, ValueError, UnicodeDecodeError) as e:
            raise AdaptError(f"remote code file {path} does not compile: {first_line(e)}") from e
    stale = stale_code_warning(directory)
    if stale:  # publishing it would hand Hub users code that may fail on their transformers
        raise AdaptError(f"refusing to push: {stale}")
    try:
        config = MaskedDiffusionConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AdaptError(f"cannot read the diffusion config in {directory}: {first_line(e)}") from e
    if not isinstance(config.mask_token_id, int):
        raise AdaptError(f"{directory}/config.json has no mask_token_id")

    stored = _stored_tensors(directory)
    ours = ("decoder.", "drafter.") if getattr(config, "drafter", None) else ("decoder.",)  # drafter: its adapter
    if not all(name.startswith(ours) for name in stored):
        odd = sorted(n for n in stored if not n.startswith(ours))[0]
        raise AdaptError(f"{directory} holds weight {odd} outside the diffusion model's decoder: not a dlm-adapt "
                         "checkpoint")
    if get_checkpoint_conversion_mapping(config.text_config.model_type) is None:
        # architectures whose stored names transformers converts on load (fused MoE experts) cannot be compared
        with torch.device("meta"):
            skeleton = MaskedDiffusionLM(config)
        groups = {}
        for name, p in skeleton.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        tied = {name: group for group in groups.values() for name in group}  # tied weights are stored once
        for name, t in skeleton.state_dict().items():
            present = [n for n in tied.get(name, [name]) if n in stored]
            if not present:
                raise AdaptError(f"{directory} lacks weight {name} of the {config.text_config.model_type} model: "
                                 "the checkpoint is incomplete")
            if list(stored[present[0]].shape) != list(t.shape):
                raise AdaptError(f"{directory}: weight {present[0]} has shape {stored[present[0]].shape}, the config "
                                 f"implies {list(t.shape)}")
    try:
        # passing the config spares transformers a second, warning-prone read of config.json
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False, config=config)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:  # older releases: ImportError (protobuf)
        raise AdaptError(f"cannot load the tokenizer in {directory}: {first_line(e)}") from e
    if tokenizer.mask_token_id != config.mask_token_id:
        raise AdaptError(f"the tokenizer in {directory} has mask token id {tokenizer.mask_token_id}, the config "
                         f"{config.mask_token_id}: the checkpoint is inconsistent")
    if not (directory / "generation_config.json").is_file():
        raise AdaptError(f"{directory} has no generation_config.json (the diffusion decoding defaults)")
    try:
        generation = GenerationConfig.from_pretrained(directory).to_dict()
    except (OSError, ValueError) as e:
        raise AdaptError(f"cannot read {directory}/generation_config.json: {first_line(e)}") from e
    dtype = raw.get("dtype") or raw.get("torch_dtype") or (raw.get("text_config") or {}).get("dtype")
    return Validated(directory, raw, tokenizer.mask_token, sum(math.prod(t.shape) for t in stored.values()),
                     str(dtype) if dtype else None, generation,
                     sorted(p.name for p in directory.glob("LICENSE*") if p.is_file()))


def _stored_tensors(directory: Path) -> dict:
    from .safetensors_io import read_shards

    if not any((directory / f).is_file() for f in ("model.safetensors.index.json", "model.safetensors")):
        raise AdaptError(f"{directory} has no model.safetensors (nor model.safetensors.index.json): dlm-adapt "
                         "checkpoints store their weights as safetensors")
    stored = {name: t for tensors in read_shards(directory).values() for name, t in tensors.items()}
    if not stored:
        raise AdaptError(f"{directory} holds no weights")
    return stored


def validate_adapter(directory: Path) -> tuple[dict, int, Validated | None]:
    """A PEFT adapter of a diffusion checkpoint: (adapter_config.json, its parameter count, the validated base when
    that is a local directory)."""
    from .safetensors_io import read_index

    try:
        adapter = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise AdaptError(f"{directory}/adapter_config.json is not readable JSON: {first_line(e)}") from e
    if not isinstance(adapter, dict) or "peft_type" not in adapter:
        raise AdaptError(f"{directory}/adapter_config.json is not a PEFT adapter config (no peft_type)")
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdaptError(f"{directory} has adapter_config.json but no adapter_model.safetensors")
    parameters = sum(math.prod(t.shape) for t in read_index(weights).values())
    base = adapter.get("base_model_name_or_path")
    local = Path(base).expanduser() if base else None
    if local is not None and local.is_dir():
        try:
            return adapter, parameters, validate(local)
        except AdaptError as e:
            raise AdaptError(f"{directory} is a PEFT adapter, but its base {base} is not a usable dlm-adapt "
                             f"checkpoint: {e}") from e
    # a base that is not here (a Hub id, or a path on another machine): PEFT recorded the class it wrapped
    if (adapter.get("auto_mapping") or {}).get("base_model_class") != "MaskedDiffusionLM":
        raise AdaptError(f"{directory} is a PEFT adapter, but its base ({base}) is not a dlm-adapt diffusion "
                         "checkpoint (adapter_config.json names no MaskedDiffusionLM base, and the base is not a "
                         "local directory to check)")
    return adapter, parameters, None


__all__ = ["ADAPTER", "ADAPTER_FILES", "CAUSAL", "CODE_FILES", "DIFFUSION", "MODEL_TYPE", "NOT_A_MODEL",
           "TRAINING_STATE", "TRAINING_STATE_FILES", "Detected", "NotDiffusionError", "Validated", "detect", "is_diffusion_model", "load", "check_device", "code_version", "stale_code_warning",
           "load_model", "remote_code_fields", "validate", "validate_adapter", "write_remote_code"]


def check_device(device: str, name: str = "--device"):
    """A device this machine has, before anything is read or computed (`name`: the option that gave it)."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise AdaptError(f"{name} {device} is not available here ({str(e).splitlines()[0]}); use cpu, or a "
                         "device this machine has") from None


_VERSION_LINE = re.compile(r'^DLM_ADAPT_VERSION = "([^"]+)"', re.M)


def code_version(directory: Path) -> str:
    """The dlm-adapt release that wrote `directory`'s remote code (0.1.0 recorded no version in the code)."""
    compat = directory / "transformers_compat.py"
    found = _VERSION_LINE.search(compat.read_text()) if compat.is_file() else None
    return found.group(1) if found else "0.1.0"


def stale_code_warning(directory: Path) -> str | None:
    """One line for users of a checkpoint whose remote code is older than this release's, else None."""
    from .model import MODEL_FILES

    if not (directory / "config.json").is_file():
        return None
    from . import __version__
    from .model.transformers_compat import _release

    stale = [f.name for f in MODEL_FILES if not (directory / f.name).is_file()
             or (directory / f.name).read_bytes() != f.read_bytes()]
    if not stale or _release(code_version(directory)) > _release(__version__):  # newer code: nothing to update
        return None
    return (f"{directory}'s remote code was written by dlm-adapt {code_version(directory)} and may not run with "
            f"transformers alone on this transformers release; update it with: dlm-adapt upgrade {directory}")

