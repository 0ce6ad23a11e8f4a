"""Training checkpoints: written to a temporary directory and renamed, so a crash mid-write (kill -9) leaves
the previous checkpoint as the newest complete one. Nothing is unpickled on load: safetensors for weights,
`torch.load(weights_only=True)` for optimizer/scheduler/RNG states, JSON for the rest."""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import AdaptError

PREFIX = "step-"


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary `.tmp-*` directories are never complete)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


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


def save(root: Path, step: int, model, optimizer, scheduler, extra_state: dict, rng: dict, is_main: bool,
         rank: int, barrier, keep: int):
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    if is_main:
        tensors, aliases = trainable_state(model)
        save_file(tensors, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "aliases": aliases, **extra_state}, indent=2))
    torch.save(rng, tmp / f"rng-{rank}.pt")
    barrier()
    if is_main:
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(path: Path, model, optimizer, scheduler, rank: int) -> tuple[dict, dict]:
    """Restore trainable weights, optimizer and scheduler; returns (state.json contents, this rank's RNG)."""
    try:
        state = json.loads((path / "state.json").read_text())
        tensors = load_file(path / "trainable.safetensors")
        missing = set(tensors) - {n for n, _ in model.named_parameters()}
        if missing:
            raise AdaptError(f"checkpoint {path} holds weights this model does not have (e.g. {sorted(missing)[0]}); "
                             "was it written with another model or method?")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = torch.load(path / f"rng-{rank}.pt", weights_only=True)
    except FileNotFoundError as e:
        raise AdaptError(f"checkpoint {path} is incomplete ({Path(e.filename).name} missing)") from e
    return state, rng
