"""`dlm-adapt train` / `adapt.train(config)`: continued training with the masked-diffusion objective while the
attention mask anneals from causal to bidirectional, on Accelerate (CPU, one GPU, DDP/FSDP/DeepSpeed).

A run is a `Recipe` whose steps follow torchtune's recipes: check the output directory, set up the data, the
output (conversion of a causal source), the model, the optimizer and what a resumed run restores, then train step
by step, each step followed by its evaluation, log line and checkpoint, and save OUTPUT/final. The order of those
steps is part of the contract: data problems surface before anything is written, and random draws happen in the
same order on a fresh and a resumed run, so a resumed run is bit-identical to an uninterrupted one.
"""

import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, get_scheduler

from .. import outputs
from . import distributed, training_state
from .annealing import annealed_inputs, check_annealing_supported, mask_ratio
from .blocks import check_block_attention, documents
from ..attention import check_trains_here
from ..checkpoint import detect
from .batch import Batch
from ..config import SFTConfig, SFTDataConfig, TrainConfig, to_dict
from ..conversion.convert import convert
from .data import SequenceLoader, build_datasets, document_separator
from .drafter_training import DrafterRun
from ..errors import AdaptError
from .forgetting import forgetting
from .likelihood import diffusion_elbo
from ..model.block_masked_diffusion import resolve_block_size, two_l_logits
from .objective import diffusion_loss, first_loss_column, noised_batch
from .retention import Retention
from .run_dir import check_output, diverged, model_settings, resume_path, truncate_metrics
from .sft_data import build_sft_datasets
from ..sources import hub_access
from .model_io import (diffusion_model, is_diffusion_checkpoint, load_for_training, param_groups, save_final,
                          source_tokenizer)


def sft(cfg: SFTConfig) -> Path | None:
    """`dlm-adapt sft` / `adapt.sft(config)`: `train` on SFT data (see `SFTConfig`)."""
    if not isinstance(cfg.data, SFTDataConfig):
        raise AdaptError("adapt.sft needs an SFTConfig: load_config(path, overrides, cls=SFTConfig)")
    return train(cfg)


def train(cfg: TrainConfig) -> Path | None:
    """Run the training described by `cfg`; returns OUTPUT/final (None when `stop_after` stopped it early)."""
    recipe = Recipe(cfg)
    recipe.setup_data()
    recipe.setup_output()
    recipe.setup_model()
    recipe.setup_optimizer()
    recipe.restore()
    return recipe.run()


class Recipe:
    """One training run. Each `setup_*` step reads what the earlier ones left on the recipe."""

    def __init__(self, cfg: TrainConfig):
        """Check OUTPUT and pick the checkpoint to resume from, before any model or data is loaded."""
        from accelerate import Accelerator

        if not str(cfg.output_dir).strip():
            raise AdaptError("output_dir is empty; name the directory to write the run into")
        self.cfg = cfg
        self.sft = isinstance(cfg.data, SFTDataConfig)
        self.out = Path(cfg.output_dir).expanduser().absolute()
        self.ckpt_root = self.out / "checkpoints"
        self.kind = "sft" if self.sft else "train"
        self.replace = check_output(cfg, self.out, self.kind)
        self.resume_from, self.skipped = resume_path(cfg, self.ckpt_root)

        self.accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, project_dir=str(self.out),
                                       log_with="tensorboard" if cfg.tensorboard else None)
        acc = self.accelerator
        distributed.enable_cpu_fsdp(acc)
        self.sharded = distributed.kind(acc)
        if self.sharded and cfg.train.method == "qlora":
            raise AdaptError(f"train.method=qlora does not run under {self.sharded}: use train.method=lora, or launch "
                             "without FSDP/DeepSpeed")
        checkpoints = (cfg.save_steps and cfg.save_steps < cfg.max_steps) or cfg.stop_after is not None
        if self.sharded == "deepspeed" and (checkpoints or cfg.resume is not False):
            raise AdaptError("training checkpoints (save_steps, stop_after, resume) are not supported under DeepSpeed "
                             "yet: set save_steps=0 and no stop_after, or launch with recipes/accelerate/fsdp.yaml")
        check_trains_here(cfg.model.attn_implementation, acc.device)  # before any model, data or output
        self.main, self.rank, self.world = acc.is_main_process, acc.process_index, acc.num_processes
        if self.main and self.skipped:
            print(f"dlm-adapt: resuming from {self.resume_from.name}, the newest complete checkpoint; removing "
                  + "; ".join(f"{p.name}, which is incomplete ({why})" for p, why in self.skipped), file=sys.stderr)
        if self.main and self.resume_from is not None and training_state.is_unverified(self.resume_from):
            print(f"dlm-adapt: warning: {self.resume_from} was written by an older dlm-adapt without a manifest; "
                  "resuming from it without checking its files' sizes and checksums", file=sys.stderr)
        self.source = cfg.model.path
        if not self.source:
            raise AdaptError("model.path is not set")
        self.drafter = DrafterRun(cfg) if cfg.drafter.enabled else None  # drafter training: training/drafter_training

    def setup_data(self):
        """Tokenise the training and validation data with the source's tokenizer: data problems surface before
        anything is converted or written."""
        cfg = self.cfg
        self.diffusion_source = is_diffusion_checkpoint(self.source)
        if self.drafter:
            self.drafter.check_source(self.source, self.diffusion_source)
        self.tokenizer, max_positions = source_tokenizer(cfg, self.source, self.diffusion_source)
        if self.diffusion_source:  # block.size unset: the checkpoint's own block size is trained
            block, row = cfg.block.final_size(detect(self.source).config.get("block_size")), _row_length(cfg)
            if block is not None and block > row[1]:
                raise AdaptError(f"{self.source} is a block-diffusion checkpoint of block size {block}, more than "
                                 f"{row[0]} ({row[1]}), the tokens of a training row: raise {row[0]}, or set "
                                 f"block.size to at most {row[1]}")
        self.separator = None  # packed text only: SFT rows hold one sample each, drafter rows one prompt
        if self.sft:
            self.train_data, self.val_data, self.chat_template = build_sft_datasets(
                cfg.data, self.tokenizer, max_positions, cfg.train.seed)
        elif self.drafter and cfg.data.generate.prompts:  # prompts now; the parent's continuations in setup_model
            checkpoint = detect(self.source).config.get("block_size") if self.diffusion_source else None
            self.train_data, self.val_data = self.drafter.prompts(cfg.data, self.tokenizer, max_positions,
                                                                  cfg.train.seed, cfg.block.largest(checkpoint))
        else:
            self.train_data, val = build_datasets(cfg.data, self.tokenizer, max_positions, cfg.train.seed)
            self.val_data = val[: cfg.data.max_eval_sequences]
            # as `pack` marked them: the 2L layout keeps the documents apart
            self.separator = document_separator(self.tokenizer, cfg.data.separator)
            if cfg.data.separator is not None and _names_token(cfg.model.mask_token, cfg.data.separator,
                                                               self.separator[1]):
                raise AdaptError(f"data.separator and model.mask_token name the same token ({cfg.data.separator!r}): "
                                 "the mask marks noised positions; name another for one of them")

    def setup_output(self):
        """Claim OUTPUT (its marker), starting over if overwrite=true, and convert a causal source into
        OUTPUT/converted once (a rerun with the same model settings reuses it)."""
        self.accelerator.wait_for_everyone()  # every process has checked OUTPUT before the main one changes it
        out = self.out
        if self.main:
            if self.replace:  # proven a run of this kind (marker) and overwrite=true: start over
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            if self.resume_from is None or outputs.marker_kind(out) is None:
                outputs.write_marker(out, self.kind, model=model_settings(self.cfg))
        if not self.diffusion_source:
            converted = out / "converted"
            if self.main and not (converted / "config.json").exists():
                model = self.cfg.model
                convert(self.source, converted, **model.source_options(), block_size=self.cfg.block.final_size(None),
                        drafter=bool(self.drafter), **self.cfg.drafter.convert_options(),
                        **({"dtype": model.dtype} if self.drafter else {}))  # a drafter's parent: kept as stored
            self.accelerator.wait_for_everyone()
            self.source = str(converted)

    def setup_model(self):
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        self.model = load_for_training(cfg, self.source)
        if not self.diffusion_source:  # conversion added the mask (and maybe pad) token: training keeps that one
            self.tokenizer = AutoTokenizer.from_pretrained(self.source, trust_remote_code=False,
                                                           config=self.model.config, **hub_access(self.source))
        if self.sft:  # saved with OUTPUT/final, so `generate --chat` renders prompts exactly as training did
            self.tokenizer.chat_template = self.chat_template
        self.dlm = diffusion_model(self.model)
        if self.separator is not None:  # packed text: `dlm-adapt eval` packs as this run did, unless told otherwise
            if self.cfg.data.separator is not None:
                self.dlm.config.document_separator = self.cfg.data.separator
            elif hasattr(self.dlm.config, "document_separator"):
                del self.dlm.config.document_separator
        self.checkpoint_block = resolve_block_size(self.dlm.config)
        final_block = cfg.block.final_size(self.checkpoint_block)
        if final_block is not None:
            if cfg.anneal.mode != "none":
                raise AdaptError(f"{self.source} is a block-diffusion checkpoint (block size "
                                 f"{self.checkpoint_block}): set anneal.mode=none; blocks replace annealing")
            self.dlm.config.block_size = final_block  # what OUTPUT/final decodes with
            check_block_attention(self.dlm)
        self.block = None  # the block size of the latest step (the schedule moves it)
        self.retention, self.terms = Retention(self), {}  # checks, and the parent's frozen copy if one is needed
        check_annealing_supported(self.dlm, cfg.anneal)
        self.global_batch = cfg.train.batch_size * self.world
        if self.drafter:  # freezes the parent; with data.generate, the parent writes the training text now
            self.drafter.prepare(self)
        self.loader = SequenceLoader(self.train_data, self.global_batch, cfg.train.seed, self.rank, self.world)

    def setup_optimizer(self):
        train = self.cfg.train
        optimizer = torch.optim.AdamW(param_groups(self.model, train), lr=train.lr, betas=tuple(train.betas),
                                      weight_decay=train.weight_decay)
        # stepped by hand once per optimizer step: Accelerate's wrapper would step it once per process
        self.scheduler = get_scheduler(train.lr_scheduler, optimizer, num_warmup_steps=train.warmup_steps,
                                       num_training_steps=self.cfg.max_steps)
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.model.train()
        self.noise = torch.Generator().manual_seed(train.seed)  # same stream on every process: global-batch noise

    def restore(self):
        """Continue a resumed run's weights, optimizer, data position and random streams; record the config and
        drop metrics logged past the checkpoint."""
        self.start_step = 0
        if self.resume_from is not None:
            model = self.model if self.sharded else self.accelerator.unwrap_model(self.model)
            loaders = {"load_optimizer": lambda o: distributed.load_optimizer_state(model, self.optimizer, o,
                                                                                    bool(self.sharded))}
            if self.sharded:  # every rank reads the full tensors and keeps its shard of them
                loaders["load_weights"] = lambda t: distributed.load_full_model_state(self.model, t)
            state, rng = training_state.load(self.resume_from, self.accelerator.unwrap_model(self.model),
                                            self.optimizer, self.scheduler, self.rank, **loaders)
            self.start_step = state["step"]
            self.loader.load_state(state["data"])
            torch.set_rng_state(rng["torch"])
            self.noise.set_state(rng["noise"])
            if torch.cuda.is_available() and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"])
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=2, default=str))
            truncate_metrics(self.out / "metrics.jsonl", self.start_step)
            for path, _ in self.skipped:  # the run continues from an earlier step: they would be pruned in its place
                shutil.rmtree(path, ignore_errors=True)
        if self.cfg.tensorboard:
            self.accelerator.init_trackers("dlm-adapt")

    def run(self) -> Path | None:
        """The training loop; OUTPUT/final, or None when `stop_after` ends this invocation early."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(range(self.start_step, cfg.max_steps), initial=self.start_step, total=cfg.max_steps,
                   disable=not self.main, desc="train")
        for step in bar:
            record = self.train_step(step)
            done = record["step"]
            if cfg.eval_steps and (done % cfg.eval_steps == 0 or done == cfg.max_steps):
                record.update(self.drafter.evaluate(self) if self.drafter else self.evaluate())
            self.log(record, bar)
            # a sharded model decodes with every rank taking part in each forward; the main one writes
            if (self.main or self.sharded) and cfg.sample_steps and done % cfg.sample_steps == 0:
                with self._whole_root():
                    _write_samples(self.dlm, self.tokenizer, self.val_data, self.out / "samples.log", done, bar,
                                   self.main)
            if self.save_checkpoint(done):
                self.accelerator.wait_for_everyone()
                return None
        return self.save_final()

    def train_step(self, step: int) -> dict:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; its metrics record. Stops the run
        on a non-finite loss or gradient norm, before the update reaches the weights."""
        cfg, acc, model = self.cfg, self.accelerator, self.model
        ratio = mask_ratio(step, cfg.anneal)
        self.block = cfg.block.size_at(step, cfg.max_steps, self.checkpoint_block)
        ga = cfg.train.gradient_accumulation_steps
        started, loss_sum, seen = time.perf_counter(), 0.0, 0
        for micro in range(ga):
            sync = acc.no_sync(model) if micro < ga - 1 else contextlib.nullcontext()
            loss, tokens = self._micro_step(self.loader.next().to(acc.device), ratio, sync)
            loss_sum += loss / ga
            seen += tokens
        # an infinite max_norm measures the norm without clipping: one non-finite gradient poisons every weight
        norm = acc.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm or math.inf)
        # DeepSpeed clips inside its engine and returns None; FSDP2 returns a replicated DTensor
        norm = None if norm is None else float(distributed.local(norm))
        loss_value = acc.reduce(torch.tensor(loss_sum, device=acc.device), "mean").item()
        done = step + 1
        # fp16 mixed precision's loss scaler makes infinite gradients on purpose and skips those steps itself
        bad_norm = norm is not None and acc.scaler is None and not math.isfinite(norm)
        if not math.isfinite(loss_value) or bad_norm:
            raise AdaptError(diverged(cfg, done, f"loss {loss_value}, gradient norm {norm}", self.ckpt_root))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        record = {"step": done, "loss": loss_value, "lr": self.scheduler.get_last_lr()[0], "mask_ratio": ratio,
                  "tokens_per_s": seen * self.world / seconds, **self.terms}
        return record if self.block is None else {**record, "block_size": self.block}

    def _micro_step(self, batch: Batch, ratio: float, sync) -> tuple[float, int]:
        """Forward and backward of this process's rows of one global batch: (loss, real tokens seen)."""
        cfg, dlm = self.cfg, self.dlm
        if self.drafter:
            return self.drafter.micro_step(self, batch, sync)
        rows = slice(self.rank * cfg.train.batch_size, (self.rank + 1) * cfg.train.batch_size)
        x0, maskable, padding = batch.split()
        per_block = self.block if cfg.block.noise == "block" else None
        x_t, x0_, masked, maskable, t = noised_batch(x0, maskable, cfg.objective, dlm.config.mask_token_id,
                                                     dlm.config.shift, self.noise, rows, self.global_batch, per_block)
        padding = padding.repeat(x_t.shape[0] // padding.shape[0], 1)  # complementary masks double the batch
        clean, first = None, 0
        with sync, self.accelerator.autocast():
            if self.block is None:
                attention = annealed_inputs(dlm, padding, ratio, self.noise)  # mask, or the causal/full path
                positions = torch.arange(x_t.shape[1], device=x_t.device).expand_as(x_t)  # rows are right-padded
                first = first_loss_column(maskable, dlm.config.shift)  # SFT: no LM head over the prompts
                logits = self.model(input_ids=x_t, **attention, position_ids=positions,
                                    logits_to_keep=torch.arange(first, x_t.shape[1], device=x_t.device)).logits
                t = t[:, first:] if t.dim() == 2 else t
            else:
                logits, clean = self._two_l_logits(x_t, x0_, padding)
            loss = diffusion_loss(logits, x0_[:, first:], masked[:, first:], maskable[:, first:], t, cfg.objective,
                                  dlm.config.shift, dlm.config.mask_token_id)
            if self.retention.enabled:  # AR loss, distillation (training/retention.py)
                extra, self.terms = self.retention.loss(self, logits, clean, x0_, masked, maskable, padding, first)
                loss = loss + extra
            self.accelerator.backward(loss / cfg.train.gradient_accumulation_steps)
        return loss.detach().float().item(), int(padding.sum())

    def _two_l_logits(self, x_t, x0, padding):
        """Block diffusion: one forward over the noised and the clean sequence (`adapt.blocks`); packed
        documents do not attend to each other (SFT rows hold one sample each, padding aside)."""
        docs = None if self.separator is None else documents(x0, self.separator)
        # through the wrapper (DDP, PEFT), not around it; the clean half's logits too for the AR loss
        out = two_l_logits(self.dlm, x_t, x0, padding, self.block, docs, forward=self.model,
                           clean_logits=self.retention.clean_stream)
        return out if self.retention.clean_stream else (out, None)

    def evaluate(self) -> dict:
        """Validation ELBO in nats per token: one low-discrepancy draw per row with a fixed seed, so every
        evaluation scores the same rows under the same noise and the curve moves only with the model. Block
        diffusion of packed text with shift: what the model kept of its parent too (`training.forgetting`)."""
        size = self.cfg.train.batch_size
        with self._whole_root():
            record = {"val_elbo": diffusion_elbo(self.dlm, self.val_data, mc_samples=1, batch_size=size, seed=1234,
                                                 block_size=self.block)["elbo_nats_per_token"]}
            if self.block is not None and not self.sft and self.dlm.config.shift:
                kept = forgetting(self.dlm, self.val_data, batch_size=size, seed=1234, block_size=self.block,
                                  separator=None if self.separator is None else self.separator[1])
                record.update({f"val_{k}": kept[k] for k in ("block_start_nll", "ar_nll", "ar_block_start_nll")},
                              val_masked_per_block=kept["masked_per_block"])
                if "within_documents" in kept:
                    record["val_within_documents"] = {k: kept["within_documents"][k] for k in
                                                      ("block_start_nll", "ar_nll", "ar_block_start_nll")}
        return record

    def _whole_root(self):
        """Calls of the diffusion model inside a sharded PEFT wrapper bypass the FSDP2 root's forward hook, which
        gathers the root's own parameters (embeddings, norm, head): gather them around such calls."""
        if self.sharded == "fsdp2" and self.dlm is not self.model:
            return distributed.unsharded(self.model)
        return contextlib.nullcontext()

    def log(self, record: dict, bar):
        cfg = self.cfg
        if not self.main or not (record["step"] % cfg.log_steps == 0 or "val_elbo" in record or "val_tv" in record):
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        shape = ({"block": record["block_size"]} if "block_size" in record  # blocks replace annealing
                 else {"ratio": f"{record['mask_ratio']:.2f}"})
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", **shape,
                        tok_s=f"{record['tokens_per_s']:.0f}")
        if cfg.tensorboard:
            self.accelerator.log(record, step=record["step"])

    def save_checkpoint(self, done: int) -> bool:
        """Write OUTPUT/checkpoints/step-N when due; returns whether `stop_after` ends this invocation here."""
        cfg, acc = self.cfg, self.accelerator
        stopping = cfg.stop_after is not None and done - self.start_step >= cfg.stop_after and done < cfg.max_steps
        saving = (cfg.save_steps and done % cfg.save_steps == 0 and done < cfg.max_steps) or stopping
        if (saving or done == cfg.max_steps) and not _finite_weights(acc, self.model):
            # finite gradients can still overflow a float16 update: never save such weights
            raise AdaptError(diverged(cfg, done, "the weights stopped being finite", self.ckpt_root))
        if saving:
            rng = {"torch": torch.get_rng_state(), "noise": self.noise.get_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            if self.sharded:  # gathered by every rank now; only the main process writes them
                tensors, aliases = distributed.trainable_state(acc, self.model)
                optimizer_state = distributed.full_optimizer_state(self.model, self.optimizer)
                weights, optimizer = (lambda: (tensors, aliases)), (lambda: optimizer_state)
            else:
                weights = lambda: training_state.trainable_state(acc.unwrap_model(self.model))  # noqa: E731
                optimizer = self.optimizer.state_dict
            training_state.save(self.ckpt_root, done, weights, optimizer, self.scheduler, {"data": self.loader.state()},
                               rng, self.main, self.rank, acc.wait_for_everyone, cfg.save_total_limit)
        return stopping

    def save_final(self) -> Path:
        self.accelerator.wait_for_everyone()
        if self.cfg.tensorboard:
            self.accelerator.end_training()
        final = self.out / "final"
        model = self.accelerator.unwrap_model(self.model)
        if self.sharded:  # gathered by every rank; the main process writes it from a full, unsharded copy
            state = distributed.full_model_state(self.accelerator, self.model)
            if self.main:
                model = self._unsharded_copy(state)
        if self.main:
            save_final(self.cfg, model, self.tokenizer, self.source, final,
                       check=self.drafter and (lambda written: self.drafter.check_final(self.source, written)))
        self.accelerator.wait_for_everyone()
        return final

    def _unsharded_copy(self, state: dict):
        """The trained model rebuilt whole on CPU from `state`, the gathered weights: the same model that
        `load_for_training` gives, so `save_final` merges and writes it as it does an unsharded run's."""
        with torch.random.fork_rng(devices=[]):  # LoRA initialisation draws; the training streams stay put
            whole = load_for_training(self.cfg, self.source)
        if getattr(self.dlm.config, "block_size", None) is not None:  # set by setup_model, not in the source
            diffusion_model(whole).config.block_size = self.dlm.config.block_size
            diffusion_model(whole).config.clean_attention = getattr(self.dlm.config, "clean_attention", None)
        distributed.check_full(state, whole)
        whole.load_state_dict(state, strict=True)
        return whole


def _names_token(spec, token: str, token_id: int) -> bool:
    """Whether a mask token spec (`model.mask_token`: a token, an id, or auto) names `token`."""
    return str(spec) == token or (str(spec).isdigit() and int(spec) == token_id)


def _row_length(cfg: TrainConfig) -> tuple[str, int]:
    return ("data.max_length", cfg.data.max_length) if isinstance(cfg.data, SFTDataConfig) else \
        ("data.seq_length", cfg.data.seq_length)


def _finite_weights(accelerator, model) -> bool:
    # each rank checks its own shard of a sharded model; the reduction covers them all
    bad = any(not torch.isfinite(distributed.local(p)).all() for p in model.parameters() if p.requires_grad)
    return accelerator.reduce(torch.tensor(float(bad), device=accelerator.device), "sum").item() == 0


@torch.no_grad()
def _write_samples(dlm, tokenizer, val_sequences: Batch, path: Path, step: int, bar, write: bool = True,
                   prompt_len: int = 8, new: int = 24):
    """A few decodes into samples.log: continuations of validation text, or answers to validation prompts."""
    device = next(dlm.parameters()).device
    rows = val_sequences[:2]
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
    if not write:
        return
    with open(path, "a") as f:
        f.write(f"--- step {step}\n" + "\n".join(texts) + "\n")
    bar.write(f"[step {step}] sample: {texts[0]!r}")
