"""Where a model comes from, as local files: a directory, a GGUF file, or a Hub model id (downloaded, then the
same code path as a directory); how to reach the Hub without waiting on retries when it cannot answer; and
`load_causal`, the one loader of a causal source (conversion, training's first look at its source, evaluation).

Publishing to the Hub is `push`; reading a dlm-adapt checkpoint is `checkpoint`."""

import functools
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import AdaptError, first_line

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# what conversion reads; never *.bin/*.pt/*.pkl (no unpickling of downloaded files)
_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "LICENSE*", "*.md"]


@dataclass
class Source:
    directory: Path  # local directory holding config/tokenizer/weights
    gguf_file: str | None = None  # file name inside `directory` when the weights are GGUF
    from_hub: bool = False  # downloaded: `directory` is a snapshot in the Hub cache


def hub_access(name: str | Path) -> dict:
    """Extra `from_pretrained` / `snapshot_download` arguments for `name`: `local_files_only` when it is a Hub id
    and the Hub cannot be reached now, so the local cache answers at once (huggingface_hub would retry every file
    for ~25 s, logging each retry, before falling back to the cache itself)."""
    if Path(name).expanduser().exists() or not _HUB_ID.match(str(name)) or hub_reachable():
        return {}
    return {"local_files_only": True}


@functools.cache
def hub_reachable() -> bool:
    """One request to the Hub endpoint without retries (offline mode counts as reachable: the cache answers)."""
    from huggingface_hub import constants, get_session

    if constants.is_offline_mode():
        return True
    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception:  # any failure of the probe (DNS, refused, timeout, TLS) means: do not wait for retries
        return False
    return True


def unreachable_message(name: str) -> str:
    from huggingface_hub import constants

    return (f"{name} is not a local path, not in the local Hugging Face cache, and the Hub ({constants.ENDPOINT}) "
            "cannot be reached; check the path, or connect and retry")


def resolve_source(source: str | Path, revision: str | None = None, gguf_file: str | None = None,
                   trust_remote_code: bool = False) -> Source:
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise AdaptError(f"source {path} is a file but not a .gguf file; pass a model directory, a .gguf file "
                             "or a Hub model id")
        return Source(path.parent.resolve(), path.name)
    if path.is_dir():
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise AdaptError(f"GGUF file {gguf_file} not found in {path}")
        if gguf_file is None and not (path / "config.json").is_file():
            raise AdaptError(f"{path} has no config.json: it is not a Hugging Face model directory "
                             "(for GGUF weights pass the .gguf file or --gguf-file)")
        return Source(path.resolve(), gguf_file)
    if not _HUB_ID.match(str(source)):
        raise AdaptError(f"source {source} does not exist (expected a local directory, a .gguf file or a Hub model id)")
    return Source(_download(str(source), revision, gguf_file, trust_remote_code), gguf_file, from_hub=True)


def _download(repo_id: str, revision: str | None, gguf_file: str | None, trust_remote_code: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = [gguf_file] if gguf_file else list(_PATTERNS)
    if gguf_file:
        patterns += ["tokenizer*", "LICENSE*"]
    if trust_remote_code:
        patterns.append("*.py")
    access = hub_access(repo_id)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, **access))
    except Exception as e:  # network, auth, missing repo: all mean "cannot get this source"
        if access:
            raise AdaptError(unreachable_message(repo_id)) from e
        raise AdaptError(f"{repo_id} is not a local path, and downloading it from the Hugging Face Hub failed "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


@dataclass
class Causal:
    config: object
    tokenizer: object
    model: object = None  # None unless the weights were asked for


# what transformers raises for a model it cannot load (older releases: ImportError for a missing protobuf)
_UNLOADABLE = (ValueError, OSError, KeyError, TypeError, ImportError, RuntimeError)


def load_causal(source: "str | Path | Source", *, gguf_file: str | None = None, trust_remote_code: bool = False,
                weights: bool = True, config=None, check: Callable | None = None, dtype=None, device=None,
                local_files_only: bool = False) -> Causal:
    """A causal LM's config, tokenizer and (with `weights`) model, each failure one `AdaptError` line naming what
    could not be read. `source`: a resolved `Source`, or what `from_pretrained` takes (a directory, a Hub id; a
    `.gguf` file path is its directory + `gguf_file`). Remote code runs only with `trust_remote_code` (the user
    asked). `config`: already read, so a GGUF file is not parsed twice for it; `check(config)` runs before the
    tokenizer loads (what the config alone rules out is said first). `dtype` as `from_pretrained` takes it
    (default: transformers' own); the model comes back on `device` (if given) in eval mode."""
    if isinstance(source, Source):
        path, gguf_file = str(source.directory), source.gguf_file
    else:
        path = str(source)
        if Path(path).suffix == ".gguf" and Path(path).expanduser().is_file():
            path, gguf_file = str(Path(path).expanduser().parent), Path(path).name
    kwargs = {"trust_remote_code": trust_remote_code, **({"gguf_file": gguf_file} if gguf_file else {}),
              **({"local_files_only": True} if local_files_only else {})}
    where = f"{path}/{gguf_file}" if gguf_file else path
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if config is None:
        try:
            config = AutoConfig.from_pretrained(path, **kwargs)
        except _UNLOADABLE as e:
            raise AdaptError(f"cannot read the model config in {where}: {first_line(e)}") from e
    if check is not None:
        check(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except _UNLOADABLE as e:
        raise AdaptError(f"cannot load a tokenizer from {where}: {first_line(e)}") from e
    if not weights:
        return Causal(config, tokenizer)
    import copy

    try:  # a copy: the caller's config stays as it read it
        model = AutoModelForCausalLM.from_pretrained(path, config=copy.deepcopy(config), **kwargs,
                                                     **({"dtype": dtype} if dtype is not None else {}))
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) met something that is not tensors
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"calls {found.group(1)}" if found else "holds more than tensors"
        raise AdaptError(f"refusing the pickled weights in {path}: unpickling them {what}, which dlm-adapt never "
                         "runs; use a safetensors copy of the model from a source you trust") from None
    except ImportError as e:
        raise AdaptError(f"{first_line(e)} (GGUF support: pip install 'dlm-adapt[gguf]')" if gguf_file
                         else f"cannot load the weights in {where}: {first_line(e)}") from e
    except _UNLOADABLE as e:
        raise AdaptError(f"cannot load the weights in {where}: {first_line(e)}") from e
    if device is not None:
        model.to(device)
    return Causal(config, tokenizer, model.eval())
