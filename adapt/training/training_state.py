"""Training checkpoints: written to a temporary directory and renamed, so a crash mid-write (kill -9) leaves
the previous checkpoint as the newest complete one. The rename alone does not prove the files are whole (a full
disk, a copy cut short, a file damaged later), so the last file written is a manifest of every other file's size
and sha256; a checkpoint whose files do not match it is not resumed from. Nothing is unpickled on load:
safetensors for weights, `torch.load(weights_only=True)` for optimizer/scheduler/RNG states, JSON for the rest."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import TRAINING_STATE_FILES
from ..errors import AdaptError
from ..outputs import write_errors

PREFIX = "step-"
MANIFEST = "manifest.json"
REQUIRED = TRAINING_STATE_FILES
_CHUNK = 16 << 20


def checkpoint_dirs(root: Path) -> list[Path]:
    """Renamed checkpoints, oldest first (temporary `.tmp-*` directories never are); `verify` says which are whole."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path):
    files = sorted(f for f in directory.iterdir() if f.is_file() and f.name != MANIFEST)
    entries = {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)} for f in files}
    (directory / MANIFEST).write_text(json.dumps({"files": entries}, indent=2))


def verify(directory: Path) -> str | None:
    """None when every file the manifest lists is there with its size and sha256; else what is wrong."""
    try:
        entries = json.loads((directory / MANIFEST).read_text())["files"]
        items = [(name, int(e["size"]), str(e["sha256"])) for name, e in entries.items()]
    except FileNotFoundError:
        # a checkpoint is renamed into place only after its manifest is written, so one without a manifest comes
        # from dlm-adapt 0.1.0, which wrote none: it can only be checked for its files (`is_unverified` says so)
        missing = [name for name in REQUIRED if not (directory / name).is_file()]
        return f"no {MANIFEST}, and {missing[0]} is missing" if missing else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable {MANIFEST} ({type(e).__name__})"
    if not set(REQUIRED) <= {n for n, _, _ in items}:
        return f"{MANIFEST} lists too few files"
    for name, size, sha in items:
        path = directory / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size} (truncated?)"
        if _sha256(path) != sha:
            return f"{name} does not match its sha256 in the manifest (damaged)"
    return None


def is_unverified(directory: Path) -> bool:
    """A checkpoint of dlm-adapt 0.1.0: no manifest to check its files against."""
    return not (directory / MANIFEST).is_file()


def newest_complete(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest verified checkpoint or None, [(newer checkpoint, why it is incomplete)])."""
    skipped = []
    for path in reversed(checkpoint_dirs(root)):
        problem = verify(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def trainable_state(model) -> tuple[dict, dict]:
    """(tensors, aliases): trainable parameters by name, each storage once (tied weights share one)."""
    tensors, aliases, seen = {}, {}, {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = p.data_ptr()
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = p.detach().to("cpu").contiguous()
    return tensors, aliases


def save(root: Path, step: int, weights, optimizer_state, scheduler, extra_state: dict, rng: dict, is_main: bool,
         rank: int, barrier, keep: int):
    """`weights` (tensors, aliases) and `optimizer_state` are full, unsharded states, read only on the main
    process: callables, so a replicated model is read there alone while a sharded one was gathered beforehand
    by every rank (`adapt.distributed`)."""
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        with write_errors(final):  # a full disk stops the run; the previous checkpoint stays the newest
            if is_main:
                tensors, aliases = weights()
                save_file(tensors, tmp / "trainable.safetensors")
                torch.save(optimizer_state(), tmp / "optimizer.pt")
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                (tmp / "state.json").write_text(json.dumps({"step": step, "aliases": aliases, **extra_state},
                                                           indent=2))
            torch.save(rng, tmp / f"rng-{rank}.pt")
            barrier()
            if is_main:
                write_manifest(tmp)  # after every rank's files, so it covers them all
                for f in tmp.iterdir():  # data on disk before the rename makes it visible
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
    except AdaptError:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if is_main:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(path: Path, model, optimizer, scheduler, rank: int, load_weights=None,
         load_optimizer=None) -> tuple[dict, dict]:
    """Restore trainable weights, optimizer and scheduler; returns (state.json contents, this rank's RNG).
    `load_weights(tensors)` / `load_optimizer(state)` replace copying into `model` / `optimizer.load_state_dict`
    for a sharded model, whose ranks each keep a part of the full tensors saved here."""
    try:
        state = json.loads((path / "state.json").read_text())
        tensors = load_file(path / "trainable.safetensors")
        missing = set(tensors) - {n for n, _ in model.named_parameters()}
        if missing:
            raise AdaptError(f"checkpoint {path} holds weights this model does not have (e.g. {sorted(missing)[0]}); "
                             "was it written with another model or method?")
        if load_weights is not None:
            load_weights(tensors)
        else:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in tensors.items():
                    params[name].copy_(value)
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
        if load_optimizer is not None:
            load_optimizer(optimizer_state)
        else:
            optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = torch.load(path / f"rng-{rank}.pt", weights_only=True)
    except FileNotFoundError as e:
        raise AdaptError(f"checkpoint {path} is incomplete ({Path(e.filename).name} missing)") from e
    return state, rng
