"""Resolving a source to local files: a directory, a GGUF file, or a Hub model id (downloaded, then the
same code path as a directory)."""

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
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # network, auth, missing repo: all mean "cannot get this source"
        raise AdaptError(f"{repo_id} is not a local path, and downloading it from the Hugging Face Hub failed "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
