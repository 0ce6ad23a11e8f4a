"""Output directories: dlm-adapt deletes or replaces only directories it can prove it wrote.

The proof is a marker file (`.dlm-adapt.json`, skipped by `push` like every hidden entry) naming the kind of
output. A directory is replaced only when it carries the marker of the same kind and the user asked for it
(--overwrite), and never when it contains, or is contained in, an input or the current directory. New outputs
are built in a temporary sibling carrying the marker and renamed into place; a rename onto a path that appeared
meanwhile is refused and only the temporary directory is removed.
"""

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from . import __version__
from .errors import AdaptError

MARKER = ".dlm-adapt.json"
STALE_SECONDS = 3600  # a temporary directory this old belongs to a killed run, not to one still writing


def read_marker(directory: Path) -> dict:
    try:
        data = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def marker_kind(directory: Path) -> str | None:
    """The kind recorded in `directory`'s marker, or None when dlm-adapt cannot prove it wrote it."""
    return read_marker(directory).get("kind")


def write_marker(directory: Path, kind: str, **extra):
    (directory / MARKER).write_text(json.dumps({"kind": kind, "dlm_adapt_version": __version__, **extra}, indent=2))


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_location(output: Path, inputs: dict[str, Path]):
    """Refuse an OUTPUT that is, contains or lies inside the current directory's ancestors or an input, that is a
    symbolic link (a loop, dangling, or pointing elsewhere: what would be replaced is not what was named), or
    whose parent cannot hold a new directory."""
    if output.is_symlink():
        raise AdaptError(f"output {output} is a symbolic link; name a real directory path")
    parent = next((p for p in output.parents if p.exists() or p.is_symlink()), None)
    if parent is not None and not parent.is_dir():
        raise AdaptError(f"output {output} lies under {parent}, which is not a directory; choose another path")
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise AdaptError(f"output {output} cannot be created: {parent} is not writable; choose another path")
    try:
        real = output.resolve(strict=False)
    except (RuntimeError, OSError) as e:  # a symbolic-link loop among the parents
        raise AdaptError(f"output {output} cannot be resolved ({e}); choose another path") from None
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise AdaptError(f"output {output} is the current directory or contains it; name a new directory")
    for what, path in inputs.items():
        if _related(real, path.resolve()):
            raise AdaptError(f"output {output} and the {what} {path} contain one another; choose a separate "
                             "output directory")


def check_target(output: Path, kind: str, overwrite: bool, inputs: dict[str, Path], advice: str) -> bool:
    """Refuse an OUTPUT that dlm-adapt may not write; returns whether it exists (and may be replaced).

    `inputs` maps a description to each input path; `advice` ends the message refusing an existing output of
    this kind without `overwrite` (how to replace it, or what else to do)."""
    check_location(output, inputs)
    if not output.exists():
        return False
    if not output.is_dir():
        raise AdaptError(f"output {output} exists and is not a directory; remove it or choose another path")
    if not any(output.iterdir()):
        return False
    found = marker_kind(output)
    if found is None:
        raise AdaptError(f"output {output} is not empty and was not written by dlm-adapt; choose a new or empty "
                         "directory (dlm-adapt replaces only its own outputs)")
    if found != kind:
        raise AdaptError(f"output {output} holds a dlm-adapt {found} output, not a {kind} output; choose another "
                         "directory")
    if not overwrite:
        raise AdaptError(f"output {output} already exists; {advice}")
    return True


def _is_write_error(e: BaseException) -> bool:
    # safetensors and torch.save report a full disk in their own exception types
    if isinstance(e, OSError):
        return True
    text = str(e)
    return ((type(e).__name__ == "SafetensorError" and "os error" in text)
            or (isinstance(e, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text)))


@contextlib.contextmanager
def write_errors(output: Path):
    """A failed write into `output` (a full disk, a quota, a file system gone read-only) as one line; removing
    the partial files is the caller's `finally`."""
    try:
        yield
    except Exception as e:
        if not _is_write_error(e):
            raise
        if isinstance(e, OSError) and e.strerror:
            reason = e.strerror + (f" ({e.filename})" if e.filename else "")
        else:  # torch.save's message ("unexpected pos ...") does not say the disk is full: the free space does
            existing = next(p for p in (output, *output.parents) if p.exists())
            free = shutil.disk_usage(existing).free / 2**20
            reason = f"{type(e).__name__} while writing, with {free:.1f} MiB free on that file system"
        raise AdaptError(f"cannot write {output}: {reason}; nothing was published. Free some space, or choose "
                         "another path") from e


def make_temp(output: Path, kind: str) -> Path:
    """A marked temporary sibling of `output`; stale ones of killed runs are removed first."""
    tmp = None
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(output)
        tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
        write_marker(tmp, kind)
    except OSError as e:  # read-only or special file systems, a full disk: nothing of ours is left behind
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise AdaptError(f"cannot write beside output {output}: {e.strerror or e}; choose another path") from None
    return tmp


def remove_stale(output: Path):
    """Temporary directories of `output` left by a killed run (kill -9, power loss): only ours, only old ones."""
    now = time.time()
    for pattern in (f".{output.name}.tmp-*", f".{output.name}.old-*"):
        for path in output.parent.glob(pattern):
            try:
                old = now - path.stat().st_mtime > STALE_SECONDS
            except OSError:
                continue
            if old and path.is_dir() and marker_kind(path) is not None:
                shutil.rmtree(path, ignore_errors=True)


def publish(tmp: Path, output: Path, kind: str, replace: bool, flag: str):
    """Rename the finished `tmp` to `output`. `replace`: `output` existed when checked and may be replaced; it is
    checked again here, because anything may have happened to it while the output was being built."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; an output should get normal permissions
    if output.exists() and replace:
        if marker_kind(output) != kind:
            raise AdaptError(f"output {output} changed during the run and is no longer a dlm-adapt {kind} output; "
                             "nothing was replaced")
        old = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.old-"))
        write_marker(old, kind)
        output.rename(old / "out")
        try:
            _rename(tmp, output, flag)
        except AdaptError:
            (old / "out").rename(output)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        _rename(tmp, output, flag)


def _rename(tmp: Path, output: Path, flag: str):
    # os.rename replaces only an empty directory; anything else at OUTPUT makes it fail, and nothing is lost
    try:
        os.rename(tmp, output)
    except OSError as e:
        raise AdaptError(f"output {output} appeared while this run was writing (another run, or a user); nothing "
                         f"was replaced. Choose another output, or pass {flag} to replace a dlm-adapt output") from e
