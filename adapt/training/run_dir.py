"""What a training run keeps in OUTPUT besides its model: whether this run may write there, which checkpoint it
resumes from, the metrics log it continues, and the one line that says what is still good when it diverges."""

import json
from pathlib import Path

from .. import outputs
from . import training_state
from ..config import TrainConfig, run_config
from ..errors import AdaptError


def model_settings(cfg: TrainConfig) -> dict:
    """What OUTPUT/converted was made from: a rerun may reuse it only with the same settings."""
    path = Path(cfg.model.path).expanduser()
    return {"path": str(path.absolute()) if path.exists() else cfg.model.path, **cfg.model.source_options(),
            **({"block_size": cfg.block.size} if cfg.block.size is not None else {})}  # absent: runs before blocks


def local_inputs(cfg: TrainConfig) -> dict[str, Path]:
    # a resume checkpoint is not one: it normally lies inside output_dir, which a resumed run never deletes
    specs = {"model.path": cfg.model.path, "data.train": cfg.data.train, "data.validation": cfg.data.validation or ""}
    found = {}
    for key, spec in specs.items():
        for i, item in enumerate(s.strip() for s in spec.split(",") if s.strip()):
            path = Path(item).expanduser()
            if path.exists():
                found[f"{key} input" + (f" #{i + 1}" if i else "")] = path
    return found


def check_output(cfg: TrainConfig, out: Path, kind: str) -> bool:
    """Refuse an output_dir this run may not write. Returns whether it is a previous run of this kind that
    overwrite=true replaces. A rerun into an existing run either resumes it or is refused."""
    advice = "set resume=true to continue it, overwrite=true to delete it and start over, or choose a new output_dir"
    if cfg.resume is not False:
        if cfg.overwrite:
            raise AdaptError("resume and overwrite=true contradict each other: resume continues OUTPUT, overwrite "
                             "deletes it; set only one")
        outputs.check_location(out, local_inputs(cfg))
        marker = outputs.read_marker(out)
        if marker and marker.get("kind") != kind:
            raise AdaptError(f"output_dir {out} holds a dlm-adapt {marker.get('kind')} run, not a {kind} run; "
                             "choose another output_dir")
        recorded, now = marker.get("model"), model_settings(cfg)
        if recorded and recorded != now:
            changed = ", ".join(f"model.{k}={now[k]!r} (was {recorded.get(k)!r})" for k in now
                                if now[k] != recorded.get(k))
            raise AdaptError(f"resume: {changed} differs from the run in {out}; restore the setting, or start a new "
                             "output_dir (or overwrite=true)")
        return False
    return outputs.check_target(out, kind, cfg.overwrite, local_inputs(cfg), advice)


def resume_path(cfg: TrainConfig, root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint to resume from and the newer ones skipped as incomplete (with why)."""
    if cfg.resume is False:
        return None, []
    if cfg.resume is True:
        found, skipped = training_state.newest_complete(root)
        if found is None:
            why = f" ({skipped[0][0].name}: {skipped[0][1]})" if skipped else ""
            raise AdaptError(f"resume=true but {root} holds no complete checkpoint{why}; to start over, "
                             "set overwrite=true instead of resume")
        return found, skipped
    path = Path(cfg.resume)
    if not (path / "state.json").is_file():
        raise AdaptError(f"resume={cfg.resume}: not a dlm-adapt training checkpoint")
    problem = training_state.verify(path)
    if problem is not None:
        raise AdaptError(f"resume={cfg.resume}: the checkpoint is incomplete ({problem}); resume from an earlier "
                         "checkpoint, or set resume=true to pick the newest complete one")
    return path, []


def diverged(cfg: TrainConfig, step: int, what: str, ckpt_root: Path) -> str:
    """One line: what went wrong at which step, the likely fix, and what on disk is still good."""
    if cfg.model.dtype == "float16" or cfg.train.mixed_precision == "fp16":
        fix = "float16 overflows: use model.dtype=bfloat16 or float32 (train.mixed_precision=bf16 or no)"
    else:
        fix = "lower train.lr (or set train.max_grad_norm)"
    found = training_state.checkpoint_dirs(ckpt_root)
    kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written"
    return f"training diverged at step {step}: {what}; {fix}. No final model was written; {kept}"


def truncate_metrics(path: Path, step: int):
    """On resume, drop lines logged after the checkpoint (a killed run may have got further), and a line a kill
    cut off mid-write."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    path.write_text("".join(ln + "\n" for ln in kept))


def training_record(directory: Path) -> tuple[TrainConfig | None, list[dict]]:
    """The run that wrote `directory`: its config (an `SFTConfig` for `dlm-adapt sft`) and metrics. `dlm-adapt
    train` writes OUTPUT/final beside OUTPUT/config.json (the resolved recipe) and OUTPUT/metrics.jsonl; anywhere
    else, or for a config this release cannot read, there is no record."""
    if directory.resolve().name != "final":
        return None, []
    parent = directory.resolve().parent
    try:
        recipe = json.loads((parent / "config.json").read_text())
    except (OSError, ValueError):
        return None, []
    if not isinstance(recipe, dict) or not {"max_steps", "train", "model", "anneal"} <= recipe.keys():
        return None, []
    try:
        cfg = run_config(recipe)
    except AdaptError:
        return None, []
    metrics = []
    try:
        for line in (parent / "metrics.jsonl").read_text().splitlines():
            if line.strip():
                metrics.append(json.loads(line))
    except (OSError, ValueError):
        metrics = []
    return cfg, metrics
