"""`dlm-adapt train` / `adapt.train(config)`: continued training with the masked-diffusion objective while the
attention mask anneals from causal to bidirectional, on Accelerate (CPU, one GPU, DDP/FSDP/DeepSpeed)."""

import contextlib
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedConfig, get_scheduler

from . import checkpointing, outputs
from .config import DTYPES, SFTConfig, SFTDataConfig, TrainConfig, to_dict
from .convert import convert
from .data import BlockLoader, build_datasets
from .errors import AdaptError
from .evaluate import diffusion_elbo
from .hub import hub_access
from .loading import load_model
from .annealing import annealed_attention_mask, check_annealing_supported, mask_ratio
from .batch import Batch
from .model import MaskedDiffusionConfig, MaskedDiffusionLM
from .objective import diffusion_loss, noised_batch
from .sft_data import build_sft_datasets

def is_diffusion_checkpoint(path: str) -> bool:
    try:
        config, _ = PreTrainedConfig.get_config_dict(path, **hub_access(path))
    except Exception:  # not a model directory / id at all: the converter gives the precise error
        return False
    return config.get("model_type") == MaskedDiffusionConfig.model_type


def load_for_training(cfg: TrainConfig, path: str):
    """The diffusion model (LoRA/QLoRA-wrapped if asked) and its tokenizer."""
    kwargs = {"dtype": DTYPES[cfg.model.dtype], "attn_implementation": cfg.model.attn_implementation}
    if cfg.train.method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except Exception as e:
            raise AdaptError(f"QLoRA needs a working bitsandbytes ({type(e).__name__}: {e}); "
                             "pip install bitsandbytes, or use train.method=lora") from e
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[cfg.model.dtype])
    model = load_model(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, config=model.config, **hub_access(path))
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.train.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if cfg.train.method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.model.gradient_checkpointing)
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=cfg.lora.target_modules,
                          trainable_token_indices=[model.config.mask_token_id] if cfg.lora.train_mask_token else None)
        try:
            model = get_peft_model(model, lora)
        except ValueError as e:
            raise AdaptError(f"LoRA target modules {cfg.lora.target_modules!r} do not fit this model: "
                             f"{str(e).splitlines()[0]}. Set lora.target_modules") from e
    return model, tokenizer


def diffusion_model(model) -> MaskedDiffusionLM:
    """The MaskedDiffusionLM inside Accelerate/PEFT wrappers."""
    while not isinstance(model, MaskedDiffusionLM):
        model = model.get_base_model() if hasattr(model, "get_base_model") else model.module
    return model


def param_groups(model, opt):
    """Attention and MLP parameters may get their own learning rates (RND1)."""
    groups = {"attention": [], "mlp": [], "other": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if re.search(r"\.(self_attn|attn|attention)\.", name):
            groups["attention"].append(p)
        elif re.search(r"\.(mlp|experts|feed_forward|block_sparse_moe)\.", name):
            groups["mlp"].append(p)
        else:
            groups["other"].append(p)
    lrs = {"attention": opt.attention_lr or opt.lr, "mlp": opt.mlp_lr or opt.lr, "other": opt.lr}
    return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


def sft(cfg: SFTConfig) -> Path | None:
    """`dlm-adapt sft` / `adapt.sft(config)`: `train` on SFT data (see `SFTConfig`)."""
    if not isinstance(cfg.data, SFTDataConfig):
        raise AdaptError("adapt.sft needs an SFTConfig: load_config(path, overrides, cls=SFTConfig)")
    return train(cfg)


def train(cfg: TrainConfig) -> Path | None:
    """Run the training described by `cfg`; returns OUTPUT/final (None when `stop_after` stopped it early)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    if not str(cfg.output_dir).strip():
        raise AdaptError("output_dir is empty; name the directory to write the run into")
    out = Path(cfg.output_dir).expanduser().absolute()
    ckpt_root = out / "checkpoints"
    kind = "sft" if isinstance(cfg.data, SFTDataConfig) else "train"
    replace = _check_output(cfg, out, kind)
    resume_from, skipped = _resume_path(cfg, ckpt_root)

    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, project_dir=str(out),
                              log_with="tensorboard" if cfg.tensorboard else None)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    if main and skipped:
        print(f"dlm-adapt: resuming from {resume_from.name}, the newest complete checkpoint; removing "
              + "; ".join(f"{p.name}, which is incomplete ({why})" for p, why in skipped), file=sys.stderr)
    if main and resume_from is not None and checkpointing.is_unverified(resume_from):
        print(f"dlm-adapt: warning: {resume_from} was written by an older dlm-adapt without a manifest; resuming "
              "from it without checking its files' sizes and checksums", file=sys.stderr)

    source = cfg.model.path
    if not source:
        raise AdaptError("model.path is not set")
    # data problems surface before anything is converted or written
    diffusion_source = is_diffusion_checkpoint(source)
    tokenizer, max_positions = _source_tokenizer(cfg, source, diffusion_source)
    sft = isinstance(cfg.data, SFTDataConfig)
    if sft:
        train_blocks, val_blocks, chat_template = build_sft_datasets(cfg.data, tokenizer, max_positions,
                                                                     cfg.train.seed)
    else:
        train_blocks, val_blocks = build_datasets(cfg.data, tokenizer, max_positions, cfg.train.seed)
        val_blocks = val_blocks[: cfg.data.max_eval_blocks]
    accelerator.wait_for_everyone()  # every process has checked OUTPUT before the main one changes it
    if main:
        if replace:  # proven a run of this kind (marker) and overwrite=true: start over
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is None or outputs.marker_kind(out) is None:
            outputs.write_marker(out, kind, model=_model_settings(cfg))
    if not diffusion_source:
        converted = out / "converted"
        if main and not (converted / "config.json").exists():
            convert(source, converted, mask_token=cfg.model.mask_token, shift=cfg.model.shift,
                    gguf_file=cfg.model.gguf_file)
        accelerator.wait_for_everyone()
        source = str(converted)

    torch.manual_seed(cfg.train.seed)
    model, tokenizer = load_for_training(cfg, source)
    if sft:  # saved with OUTPUT/final, so `generate --chat` renders prompts exactly as training did
        tokenizer.chat_template = chat_template
    dlm = diffusion_model(model)
    check_annealing_supported(dlm, cfg.anneal)
    mask_id, shift = dlm.config.mask_token_id, dlm.config.shift
    global_batch = cfg.train.batch_size * world
    loader = BlockLoader(train_blocks, global_batch, cfg.train.seed, rank, world)

    optimizer = torch.optim.AdamW(param_groups(model, cfg.train), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay)
    # stepped by hand once per optimizer step: Accelerate's wrapper would step it once per process
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=cfg.train.warmup_steps,
                              num_training_steps=cfg.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    noise = torch.Generator().manual_seed(cfg.train.seed)  # same stream on every process: global-batch noise

    start_step = 0
    if resume_from is not None:
        state, rng = checkpointing.load(resume_from, accelerator.unwrap_model(model), optimizer, scheduler, rank)
        start_step = state["step"]
        loader.load_state(state["data"])
        torch.set_rng_state(rng["torch"])
        noise.set_state(rng["noise"])
        if torch.cuda.is_available() and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
        _truncate_metrics(out / "metrics.jsonl", start_step)
        for path, _ in skipped:  # the run continues from an earlier step: these would only be pruned in its place
            shutil.rmtree(path, ignore_errors=True)
    if cfg.tensorboard:
        accelerator.init_trackers("dlm-adapt")

    ga = cfg.train.gradient_accumulation_steps
    rows = slice(rank * cfg.train.batch_size, (rank + 1) * cfg.train.batch_size)
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, disable=not main,
               desc="train")
    for step in bar:
        ratio = mask_ratio(step, cfg.anneal)
        started, loss_sum, seen = time.perf_counter(), 0.0, 0
        for micro in range(ga):
            x0, maskable, padding = loader.next().to(accelerator.device).split()
            x_t, x0_, masked, maskable, t = noised_batch(x0, maskable, cfg.objective, mask_id, shift, noise, rows,
                                                         global_batch)
            padding = padding.repeat(x_t.shape[0] // padding.shape[0], 1)  # complementary masks double the batch
            attention = annealed_attention_mask(dlm, padding, ratio, noise)
            positions = torch.arange(x_t.shape[1], device=x_t.device).expand_as(x_t)  # rows are right-padded
            sync = accelerator.no_sync(model) if micro < ga - 1 else contextlib.nullcontext()
            with sync, accelerator.autocast():
                logits = model(input_ids=x_t, attention_mask=attention, position_ids=positions).logits
                loss = diffusion_loss(logits, x0_, masked, maskable, t, cfg.objective, shift)
                accelerator.backward(loss / ga)
            loss_sum += loss.detach().float().item() / ga
            seen += int(padding.sum())
        # an infinite max_norm measures the norm without clipping: one non-finite gradient poisons every weight
        norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm or math.inf)
        norm = None if norm is None else float(norm)  # DeepSpeed clips inside its engine and returns None
        loss_value = accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "mean").item()
        done = step + 1
        # fp16 mixed precision's loss scaler makes infinite gradients on purpose and skips those steps itself
        bad_norm = norm is not None and accelerator.scaler is None and not math.isfinite(norm)
        if not math.isfinite(loss_value) or bad_norm:
            raise AdaptError(_diverged(cfg, done, f"loss {loss_value}, gradient norm {norm}", ckpt_root))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        record = {"step": done, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "mask_ratio": ratio,
                  "tokens_per_s": seen * world / seconds}
        if cfg.eval_steps and (done % cfg.eval_steps == 0 or done == cfg.max_steps):
            # one low-discrepancy draw per block, fixed seed: the same blocks and noise at every evaluation
            record["val_elbo"] = diffusion_elbo(dlm, val_blocks, mc_samples=1, batch_size=cfg.train.batch_size,
                                                seed=1234)["elbo_nats_per_token"]
        if main and (done % cfg.log_steps == 0 or "val_elbo" in record):
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{record['lr']:.2e}", ratio=f"{ratio:.2f}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
            if cfg.tensorboard:
                accelerator.log(record, step=done)
        if main and cfg.sample_steps and done % cfg.sample_steps == 0:
            _write_samples(dlm, tokenizer, val_blocks, out / "samples.log", done, bar)
        stopping = cfg.stop_after is not None and done - start_step >= cfg.stop_after and done < cfg.max_steps
        saving = (cfg.save_steps and done % cfg.save_steps == 0 and done < cfg.max_steps) or stopping
        if (saving or done == cfg.max_steps) and not _finite_weights(accelerator, model):
            # finite gradients can still overflow a float16 update: never save such weights
            raise AdaptError(_diverged(cfg, done, "the weights stopped being finite", ckpt_root))
        if saving:
            rng = {"torch": torch.get_rng_state(), "noise": noise.get_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            checkpointing.save(ckpt_root, done, accelerator.unwrap_model(model), optimizer, scheduler,
                               {"data": loader.state()}, rng, main, rank, accelerator.wait_for_everyone,
                               cfg.save_total_limit)
        if stopping:
            accelerator.wait_for_everyone()
            return None
    accelerator.wait_for_everyone()
    if cfg.tensorboard:
        accelerator.end_training()
    final = out / "final"
    if main:
        _save_final(cfg, accelerator.unwrap_model(model), tokenizer, source, final)
    accelerator.wait_for_everyone()
    return final


def _source_tokenizer(cfg: TrainConfig, source: str, diffusion_source: bool):
    """The tokenizer and position limit of the model to train, read before any conversion."""
    from transformers import AutoConfig

    extra = {"gguf_file": cfg.model.gguf_file} if cfg.model.gguf_file else {}
    src = Path(source)
    if src.suffix == ".gguf" and src.is_file():
        source, extra = str(src.parent), {"gguf_file": src.name}
    try:
        if diffusion_source:  # our config passed on: AutoConfig would need remote code for our model type
            extra["config"] = MaskedDiffusionConfig.from_pretrained(source)
            config = extra["config"].text_config
        else:
            config = AutoConfig.from_pretrained(source, trust_remote_code=False, **extra)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **extra)
    except (OSError, ValueError, KeyError) as e:
        raise AdaptError(f"cannot load model.path={cfg.model.path}: {str(e).splitlines()[0]}") from e
    return tokenizer, getattr(config, "max_position_embeddings", None)


def _model_settings(cfg: TrainConfig) -> dict:
    """What OUTPUT/converted was made from: a rerun may reuse it only with the same settings."""
    path = Path(cfg.model.path).expanduser()
    return {"path": str(path.absolute()) if path.exists() else cfg.model.path, "mask_token": cfg.model.mask_token,
            "shift": cfg.model.shift, "gguf_file": cfg.model.gguf_file}


def _local_inputs(cfg: TrainConfig) -> dict[str, Path]:
    # a resume checkpoint is not one: it normally lies inside output_dir, which a resumed run never deletes
    specs = {"model.path": cfg.model.path, "data.train": cfg.data.train, "data.validation": cfg.data.validation or ""}
    found = {}
    for key, spec in specs.items():
        for i, item in enumerate(s.strip() for s in spec.split(",") if s.strip()):
            path = Path(item).expanduser()
            if path.exists():
                found[f"{key} input" + (f" #{i + 1}" if i else "")] = path
    return found


def _check_output(cfg: TrainConfig, out: Path, kind: str) -> bool:
    """Refuse an output_dir this run may not write. Returns whether it is a previous run of this kind that
    overwrite=true replaces. A rerun into an existing run either resumes it or is refused."""
    advice = "set resume=true to continue it, overwrite=true to delete it and start over, or choose a new output_dir"
    if cfg.resume is not False:
        if cfg.overwrite:
            raise AdaptError("resume and overwrite=true contradict each other: resume continues OUTPUT, overwrite "
                             "deletes it; set only one")
        outputs.check_location(out, _local_inputs(cfg))
        marker = outputs.read_marker(out)
        if marker and marker.get("kind") != kind:
            raise AdaptError(f"output_dir {out} holds a dlm-adapt {marker.get('kind')} run, not a {kind} run; "
                             "choose another output_dir")
        recorded, now = marker.get("model"), _model_settings(cfg)
        if recorded and recorded != now:
            changed = ", ".join(f"model.{k}={now[k]!r} (was {recorded.get(k)!r})" for k in now
                                if now[k] != recorded.get(k))
            raise AdaptError(f"resume: {changed} differs from the run in {out}; restore the setting, or start a new "
                             "output_dir (or overwrite=true)")
        return False
    return outputs.check_target(out, kind, cfg.overwrite, _local_inputs(cfg), advice)


def _resume_path(cfg: TrainConfig, root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint to resume from and the newer ones skipped as incomplete (with why)."""
    if cfg.resume is False:
        return None, []
    if cfg.resume is True:
        found, skipped = checkpointing.newest_complete(root)
        if found is None:
            why = f" ({skipped[0][0].name}: {skipped[0][1]})" if skipped else ""
            raise AdaptError(f"resume=true but {root} holds no complete checkpoint{why}; to start over, "
                             "set overwrite=true instead of resume")
        return found, skipped
    path = Path(cfg.resume)
    if not (path / "state.json").is_file():
        raise AdaptError(f"resume={cfg.resume}: not a dlm-adapt training checkpoint")
    problem = checkpointing.verify(path)
    if problem is not None:
        raise AdaptError(f"resume={cfg.resume}: the checkpoint is incomplete ({problem}); resume from an earlier "
                         "checkpoint, or set resume=true to pick the newest complete one")
    return path, []


def _finite_weights(accelerator, model) -> bool:
    bad = any(not torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
    return accelerator.reduce(torch.tensor(float(bad), device=accelerator.device), "sum").item() == 0


def _diverged(cfg: TrainConfig, step: int, what: str, ckpt_root: Path) -> str:
    """One line: what went wrong at which step, the likely fix, and what on disk is still good."""
    if cfg.model.dtype == "float16" or cfg.train.mixed_precision == "fp16":
        fix = "float16 overflows: use model.dtype=bfloat16 or float32 (train.mixed_precision=bf16 or no)"
    else:
        fix = "lower train.lr (or set train.max_grad_norm)"
    found = checkpointing.checkpoint_dirs(ckpt_root)
    kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written"
    return f"training diverged at step {step}: {what}; {fix}. No final model was written; {kept}"


def _truncate_metrics(path: Path, step: int):
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


@torch.no_grad()
def _write_samples(dlm, tokenizer, val_blocks: Batch, path: Path, step: int, bar, prompt_len: int = 8, new: int = 24):
    """A few decodes into samples.log: continuations of validation text, or answers to validation prompts."""
    device = next(dlm.parameters()).device
    rows = val_blocks[:2]
    if rows.maskable is not None:  # SFT: each sample's prompt is everything before its first answer token
        prompts = [ids[: int(trained.nonzero()[0])] for ids, trained in zip(rows.input_ids, rows.maskable)
                   if trained.any()]
    else:
        prompts = list(rows.input_ids[:, :prompt_len])
    was_training = dlm.training
    dlm.eval()
    texts = []
    for prompt in prompts:  # one at a time: SFT prompts differ in length
        out = dlm.diffusion_generate(prompt[None].to(device), max_new_tokens=new, steps=new)
        texts.append(tokenizer.decode(out[0], skip_special_tokens=False))
    dlm.train(was_training)
    with open(path, "a") as f:
        f.write(f"--- step {step}\n" + "\n".join(texts) + "\n")
    bar.write(f"[step {step}] sample: {texts[0]!r}")


def _save_final(cfg: TrainConfig, model, tokenizer, source: str, final: Path):
    tmp = final.parent / ".final-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with outputs.write_errors(final):
            if cfg.train.method == "full":
                model.save_pretrained(tmp)
            elif cfg.lora.save_adapter_only:
                model.save_pretrained(tmp)  # a PEFT adapter: PeftModel.from_pretrained(base diffusion model, dir)
            else:
                if cfg.train.method == "qlora":  # merge into full-precision weights, not into the 4-bit ones
                    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

                    base = MaskedDiffusionLM.from_pretrained(source, dtype=DTYPES[cfg.model.dtype])
                    full = get_peft_model(base, model.peft_config["default"])
                    set_peft_model_state_dict(full, get_peft_model_state_dict(model))
                    model = full
                model.merge_and_unload().save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except AdaptError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
