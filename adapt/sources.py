"""Where a model comes from, as local files: a directory, a GGUF file, or a Hub model id (downloaded, then the
same code path as a directory); and how to reach the Hub without waiting on retries when it cannot answer.

Publishing to the Hub is `push`; reading a dlm-adapt checkpoint is `checkpoint`."""

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import AdaptError

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
