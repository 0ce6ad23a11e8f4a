"""`dlm-adapt upgrade DIR [--check]`: bring a checkpoint written by an earlier dlm-adapt to the current format.

Only small files change: the remote-code files (what transformers runs for `trust_remote_code=True`), the
`auto_map`/`architectures` fields of `config.json`, and the pad-token policy (left padding; a checkpoint without a
pad token gets EOS as pad, in `tokenizer_config.json` and `generation_config.json`). Each file is written beside itself and renamed
over the old one, so a file is always either wholly old or wholly new. Weight files are never opened for writing.
"""

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..config import UpgradeOptions
from ..checkpoint import code_version
from ..errors import AdaptError

@dataclass
class UpgradeResult:
    directory: Path
    code_version: str
    """The dlm-adapt release that wrote the checkpoint's remote code."""
    changes: dict[str, bytes] = field(default_factory=dict)
    """File name -> its new content."""
    written: bool = False

    @property
    def needed(self) -> bool:
        return bool(self.changes)

    def report(self) -> str:
        from .. import __version__

        if not self.needed:
            return f"{self.directory} is up to date (remote code of dlm-adapt {__version__})"
        files = ", ".join(sorted(self.changes))
        if self.written:
            return f"upgraded {self.directory} from dlm-adapt {self.code_version} to {__version__}: rewrote {files}"
        return (f"{self.directory} needs an upgrade (remote code of dlm-adapt {self.code_version}; this is "
                f"{__version__}): would rewrite {files}; run: dlm-adapt upgrade {self.directory}")


def plan_upgrade(directory: str | Path) -> UpgradeResult:
    """What `upgrade` would rewrite in `directory`, without writing anything."""
    from ..model import MODEL_FILES, remote_code_fields

    from .. import __version__
    from ..model.transformers_compat import _release

    directory = Path(directory).expanduser()
    config = _read_checkpoint_config(directory)
    result = UpgradeResult(directory, code_version(directory))
    if _release(result.code_version) > _release(__version__):
        raise AdaptError(f"{directory}'s code was written by dlm-adapt {result.code_version}, newer than this "
                         f"{__version__}; upgrade dlm-adapt (pip install -U dlm-adapt) instead of its code")
    for src in MODEL_FILES:
        new = src.read_bytes()
        old = directory / src.name
        if not old.is_file() or old.read_bytes() != new:
            result.changes[src.name] = new

    updated = dict(config, **remote_code_fields())
    text = dict(updated.get("text_config") or {})
    text["is_causal"] = not updated.get("bidirectional", True)
    updated["text_config"] = text
    if updated != config:
        result.changes["config.json"] = _json_bytes(updated)

    _plan_pad_token(directory, result)
    return result


def upgrade(directory: str | Path, **options) -> UpgradeResult:
    """Rewrite `directory`'s remote code and outdated config fields to this release's format, in place (each file
    replaced atomically; weights untouched). `options`: the fields of `adapt.config.UpgradeOptions` (with
    `check`, only report what would change)."""
    o = UpgradeOptions(**options)
    result = plan_upgrade(directory)
    if o.check or not result.needed:
        return result
    written = []
    for name, content in result.changes.items():
        try:
            _replace(result.directory / name, content)
        except PermissionError:  # a read-only checkpoint (a shared cache, a mount, another user's files)
            done = f"; {', '.join(written)} already rewritten (each file whole)" if written else "; nothing changed"
            raise AdaptError(f"cannot write {result.directory / name}: permission denied{done}. Make "
                             f"{result.directory} and its files writable (chmod -R u+w), or upgrade a copy of it"
                             ) from None
        written.append(name)
    result.written = True
    return result


def _read_checkpoint_config(directory: Path) -> dict:
    from ..checkpoint import ADAPTER, DIFFUSION, detect

    if not directory.is_dir():
        raise AdaptError(f"{directory} is not a directory; upgrade takes a dlm-adapt checkpoint directory")
    found = detect(directory)
    if found.kind == ADAPTER:
        raise AdaptError(f"{directory} is a PEFT adapter, which holds no remote code; upgrade the checkpoint it "
                         "adapts (its base_model_name_or_path) instead")
    if not found.has_config:
        raise AdaptError(f"{directory} has no config.json: not a dlm-adapt checkpoint, nothing to upgrade")
    if found.error is not None:
        raise AdaptError(f"{directory}/config.json is not valid JSON ({found.error}); not a checkpoint upgrade can "
                         "read")
    if found.kind != DIFFUSION:
        raise AdaptError(f"{directory} is a '{found.model_type}' checkpoint, not a dlm-adapt diffusion checkpoint; "
                         "upgrade only rewrites dlm-adapt checkpoints (convert a causal LM with: dlm-adapt convert "
                         "SOURCE OUTPUT)")
    if not any(directory.glob("*.safetensors")):
        raise AdaptError(f"{directory} has a dlm-adapt config but no *.safetensors weights; point upgrade at the "
                         "checkpoint directory itself (e.g. OUTPUT/final or OUTPUT/checkpoints/step-N)")
    _check_weights(directory)
    return found.config


def _check_weights(directory: Path):
    """Upgrade rewrites code only; "upgraded" must not be said of a checkpoint whose weights cannot load. The
    safetensors headers are checked against the file sizes (no tensor is read)."""
    from ..safetensors_io import read_shards

    try:
        read_shards(directory)
    except AdaptError as e:
        raise AdaptError(f"{directory} cannot be used whatever its code: {e}") from None


def _plan_pad_token(directory: Path, result: UpgradeResult):
    """Batched prompts need left padding and a pad token: checkpoints converted without one get EOS as pad (never
    the mask), as `convert` now does."""
    tok_file, gen_file = directory / "tokenizer_config.json", directory / "generation_config.json"
    if not tok_file.is_file():
        return
    from ..conversion.convert import padding_policy

    tok = json.loads(tok_file.read_text())
    updated = padding_policy(tok)
    if updated != tok:
        result.changes[tok_file.name] = _json_bytes(updated)
    if gen_file.is_file():
        gen = json.loads(gen_file.read_text())
        if gen.get("pad_token_id") is None and gen.get("eos_token_id") is not None:
            eos_id = gen["eos_token_id"]
            result.changes[gen_file.name] = _json_bytes(dict(gen, pad_token_id=eos_id[0] if isinstance(eos_id, list)
                                                             else eos_id))


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _replace(path: Path, content: bytes):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        else:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = ["UpgradeResult", "plan_upgrade", "upgrade"]
