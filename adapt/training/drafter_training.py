"""Drafter training (`drafter.enabled` in a recipe; issue 25, REFERENCE §14): distil the frozen parent into the
drafter adapter of a drafter checkpoint, so that speculative decoding accepts more of its drafts.

`Recipe` (training/recipe.py) runs the steps as for any run (Accelerate, checkpoints and resume, metrics.jsonl,
OUTPUT/final); `DrafterRun` is what differs: the checkpoint must hold a drafter adapter (a causal source is
converted with `--drafter`), only `model.drafter` trains, the training text may be the parent's own continuations
of training-text prompts (`data.generate`), a step distils the parent's next-token distributions into the drafter's
at random draft groups (`adapt.training.distill`), validation reports the expected acceptance per draft position,
and OUTPUT/final must hold the parent's tensors byte for byte as the source has them.
"""

import json
import sys
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .batch import Batch
from ..checkpoint import detect
from ..config import DTYPES, TrainConfig
from .data import hold_out, load_documents
from .distill import distill_loss, draft_statistics, summarize
from .sft_data import user_turns
from ..errors import AdaptError
from ..model.drafter_masked_diffusion import drafter_training_logits, drafting
from ..safetensors_io import read_shards, torch_dtype

SELF_DISTILL_FILE = "self_distill.safetensors"
EVAL_SEED = 1234  # every validation drafts the same groups: the curve moves only with the drafter


FIRST_CUT = 2  # a group drafts the tokens from its cut on, given the text before cut - 1 (`drafter_training_logits`)


def draft_cuts(lengths: torch.Tensor, width: int, k: int, groups: int | None, generator: torch.Generator,
               starts: torch.Tensor | None = None):
    """(cuts (batch, G), valid (batch, G, k)): where each group's k drafted tokens start, in [start, length - k] of
    each row, and which groups count (a group that does not fit its row is clamped and does not count). `starts`
    (batch,): each row's first cut; None: 2 (`FIRST_CUT`). `groups` None covers each row: cuts every k tokens from a
    random offset in [start, start + k - 1]; else `groups` cuts drawn uniformly in each row's range."""
    batch, low = len(lengths), FIRST_CUT
    if width - k < low:
        raise AdaptError(f"a training row of {width} tokens is too short to draft {k} tokens after {low}: lower the "
                         f"draft length (block.size) to at most {width - low}, or lengthen the rows")
    start = (torch.full((batch,), low) if starts is None else starts.cpu().clamp_min(low))[:, None]
    last = (lengths.cpu()[:, None] - k).clamp_min(low)
    room = (last - start).clamp_min(0)  # the cuts a row holds, minus one
    if groups is None:
        count = max(1, int(room.max()) // k + 1)
        span = (room - k * (count - 1) + 1).clamp(1, k)  # the offsets that keep the last group inside the row
        offset = start + (torch.rand(batch, 1, generator=generator) * span).long()
        cuts = offset + k * torch.arange(count)[None]
    else:
        cuts = start + (torch.rand(batch, groups, generator=generator) * (room + 1)).long()
    valid = (cuts <= last) & (start <= last)
    cuts = torch.minimum(cuts, last).to(lengths.device)
    return cuts, valid[:, :, None].expand(-1, -1, k).to(lengths.device)


def continuation_starts(batch: Batch) -> torch.Tensor | None:
    """Each row's first cut when only its continuation is drafted (rows with `maskable`, the parent's own
    continuations of prompts): one past the first maskable token, as decoding's first round drafts one past the
    parent's first token. None: rows without a prompt (text), drafted from `FIRST_CUT` on."""
    if batch.maskable is None:
        return None
    return batch.maskable.int().argmax(1) + 1


def _without(logits: torch.Tensor, token: int) -> torch.Tensor:
    """Neither model produces `token` ([MASK]) when decoding (`TokenChoice`): zero probability for both here."""
    return logits.float().masked_fill(torch.arange(logits.shape[-1], device=logits.device) == token, -torch.inf)


def distilled_logits(model, batch: Batch, k: int, groups: int | None, generator: torch.Generator, forward=None):
    """(student, teacher, valid, real tokens) for one batch: draft groups drawn with `generator`; one forward of
    the clean rows and every group (`drafter_training_logits`), through `forward` (a training wrapper) if given."""
    ids, padding = batch.input_ids, batch.padding
    cuts, valid = draft_cuts(padding.sum(1), ids.shape[1], k, groups, generator, continuation_starts(batch))
    student, teacher = drafter_training_logits(model, ids, padding, cuts, k, forward=forward)
    mask_id = model.config.mask_token_id
    return _without(student, mask_id), _without(teacher, mask_id), valid, int(padding.sum())


def every_cut(batch: Batch, k: int):
    """(cuts (batch, G), valid (batch, G), starts (batch,)): a group at every cut of each row's continuation, from
    its start (`continuation_starts`) to length - k, clamped and not valid past a row's last."""
    start, last = continuation_starts(batch), batch.padding.sum(1) - k
    cuts = start[:, None] + torch.arange(max(1, int((last - start).max()) + 1), device=start.device)
    return torch.minimum(cuts, last[:, None].clamp_min(FIRST_CUT)), cuts <= last[:, None], start


def round_starts(runs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(batch, G) bool: the groups of `every_cut` where greedy speculative decoding's rounds start, given `runs`,
    each group's leading run of drafts equal to the parent's argmax: the prompt's forward drafts from the first
    cut; a round accepting a drafts commits a + 1 tokens, so the next drafts start a + 1 cuts later."""
    starts = torch.zeros_like(valid)
    for row, (row_runs, row_valid) in enumerate(zip(runs.tolist(), valid.tolist())):
        at = 0
        while at < len(row_runs) and row_valid[at]:
            starts[row, at] = True
            at += row_runs[at] + 1
    return starts


@torch.no_grad()
def greedy_walk(model, batch: Batch, k: int) -> tuple[int, int]:
    """(tokens, forwards) of greedy speculative decoding without guessing over the rows' continuations (rows with
    `maskable`), when each continuation is the parent's greedy text of its prompt (`data.generate` at temperature
    0): decoding then follows the text, so its rounds are the training view's groups at the cuts it reaches
    (`round_starts`), and the prompt's forward commits the parent's first token. Validation's other figures
    average groups at uniform cuts, which overstates this: decoding's rounds start where the last was rejected."""
    cuts, valid, first = every_cut(batch, k)
    student, teacher = drafter_training_logits(model, batch.input_ids, batch.attention_mask, cuts, k)
    mask_id = model.config.mask_token_id
    runs = (_without(student, mask_id).argmax(-1) == _without(teacher, mask_id).argmax(-1)).long().cumprod(-1).sum(-1)
    starts = round_starts(runs, valid)
    continuation = batch.padding.sum(1) - first + 1
    committed = 1 + ((runs + 1) * starts).sum(1)  # the last round's token after the text is not in the row
    return int(torch.minimum(committed, continuation).sum()), int((1 + starts.sum(1)).sum())


class DrafterRun:
    """The drafter side of a `Recipe` (see the module docstring); each method is called from the recipe step of
    the same name."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.drafter
        self.generate = cfg.data.generate

    def check_source(self, source: str, diffusion_source: bool):
        """A diffusion checkpoint must carry a drafter adapter (a causal source gets one when converted)."""
        if diffusion_source and not detect(source).config.get("drafter"):
            raise AdaptError(f"model.path {source} is a diffusion checkpoint without a drafter adapter: drafter "
                             "training needs `dlm-adapt convert SRC OUT --drafter --block-size K`, or model.path set "
                             "to the causal source (the run converts it with a drafter)")

    def prompts(self, data, tokenizer, max_positions: int | None, seed: int, draft: int | None) -> tuple[Batch, Batch]:
        """data.generate: (training prompts, validation prompts), each the first `prompt_length` tokens of a
        document (training documents, and held-out or validation ones); generation replaces them with rows.
        `draft`: the longest draft length trained, which must fit in a continuation after the parent's first token."""
        g = self.generate
        if draft is not None and draft >= g.new_tokens:  # decoding drafts from one past the parent's first token
            raise AdaptError(f"data.generate.new_tokens ({g.new_tokens}) leaves no room to draft {draft} tokens after "
                             f"the parent's first: raise it to at least {draft + 1}, or lower the draft length "
                             "(block.size)")
        if not data.train:
            raise AdaptError("data.train is not set: data.generate takes its prompts from the training text")
        docs = load_documents(data.train, data)
        if data.validation:
            val_docs = load_documents(data.validation, data)
        else:
            docs, val_docs = hold_out(docs, data.validation_fraction, seed, data.train, "documents")
        train = _first_tokens(docs, tokenizer, g.prompt_length, g.prompts)
        val = _first_tokens(val_docs, tokenizer, g.prompt_length, data.max_eval_sequences)
        if len(train) < g.prompts or not len(val):
            what, have = ("training", len(train)) if len(train) < g.prompts else ("validation", 0)
            raise AdaptError(f"data.generate needs {g.prompts if what == 'training' else 1} {what} prompts of "
                             f"{g.prompt_length} tokens, but the {what} text has {have} documents that long: lower "
                             "data.generate.prompts or prompt_length, or add text")
        train, val = Batch(train), Batch(val)
        if g.chat_message is not None:
            train, val = (chat_prompts(rows, tokenizer, g.chat_message) for rows in (train.input_ids, val.input_ids))
        width = max(train.shape[1], val.shape[1])
        if max_positions is not None and width + g.new_tokens > max_positions:
            raise AdaptError(f"data.generate: prompts of {width} tokens + new_tokens ({g.new_tokens}) exceed the "
                             f"model's {max_positions} positions; lower prompt_length or new_tokens")
        return train, val

    def prepare(self, recipe):
        """Freeze the parent, check what the run needs, and write or reuse the self-distillation data."""
        dlm = recipe.dlm
        if recipe.world > 1:
            raise AdaptError("drafter training runs in one process for now (one GPU, or CPU): launch without "
                             "accelerate's multi-process configs")
        if getattr(dlm, "drafter", None) is None:  # a converted causal source always has one
            raise AdaptError(f"{recipe.source} has no drafter adapter")
        stored = _parent_dtype(recipe.source)
        if stored is not None and stored != dlm.dtype:
            name = next(n for n, d in DTYPES.items() if d == stored)
            raise AdaptError(f"model.dtype={recipe.cfg.model.dtype}, but the parent is stored in {name}: a drafter run "
                             f"keeps the parent's weights byte for byte; set model.dtype={name}")
        for name, p in dlm.named_parameters():
            p.requires_grad_(name.startswith("drafter."))
        if self.generate.prompts:
            recipe.train_data, recipe.val_data = self_distill(recipe, self.generate)

    def micro_step(self, recipe, batch: Batch, sync) -> tuple[float, int]:
        # the backward inside `drafting` too: recomputed (checkpointed) layers must see the adapter and its gate
        with sync, recipe.accelerator.autocast(), drafting(recipe.dlm, start=batch.input_ids.shape[1]):
            student, teacher, valid, tokens = distilled_logits(recipe.dlm, batch, recipe.block, self.cfg.groups,
                                                               recipe.noise, forward=recipe.model)
            loss = distill_loss(student, teacher, self.cfg.loss, self.cfg.temperature, valid)
            recipe.accelerator.backward(loss / recipe.cfg.train.gradient_accumulation_steps)
        return loss.detach().float().item(), tokens

    @torch.no_grad()
    def evaluate(self, recipe) -> dict:
        """Validation: the loss, TV, and per draft position the expected acceptance (sampling at
        `drafter.temperature`, and greedy), with the tokens one round would yield (`distill.draft_statistics`)."""
        dlm, size, generator = recipe.dlm, recipe.cfg.train.batch_size, torch.Generator().manual_seed(EVAL_SEED)
        device, sums, loss, count = recipe.accelerator.device, None, 0.0, 0
        # greedy decoding's own figure needs rows that are the parent's greedy text
        walks, walked = bool(self.generate.prompts) and self.generate.temperature == 0, (0, 0)
        was_training = dlm.training
        dlm.eval()
        for start in range(0, len(recipe.val_data), size):
            batch = recipe.val_data[start:start + size].to(device)
            student, teacher, valid, _ = distilled_logits(dlm, batch, recipe.block, self.cfg.groups, generator)
            part = draft_statistics(student, teacher, self.cfg.temperature, valid)
            sums = part if sums is None else {key: sums[key] + part[key] for key in sums}
            loss += float(distill_loss(student, teacher, self.cfg.loss, self.cfg.temperature, valid)) * len(batch)
            count += len(batch)
            if walks:
                walked = [a + b for a, b in zip(walked, greedy_walk(dlm, batch, recipe.block))]
        dlm.train(was_training)
        record = {"val_loss": loss / count, **summarize(sums)}
        if walks:
            record["val_greedy_tokens_per_forward"] = walked[0] / max(1, walked[1])
        return record

    def check_final(self, source: str, written):
        """OUTPUT/final (being written at `written`) holds every tensor of the parent exactly as the source
        stores it (dtype, shape, bytes): only `drafter.*` tensors may differ."""
        check_parent_untouched(source, written)


def check_parent_untouched(source, written):
    def stored(directory):
        return {name: t for shard in read_shards(Path(directory)).values() for name, t in shard.items()}

    before, after = stored(source), stored(written)
    parent = {name for name in before if not name.startswith("drafter.")}
    missing = parent - after.keys()
    changed = sorted(name for name in parent - missing if (before[name].dtype, before[name].shape) != (
        after[name].dtype, after[name].shape) or not torch.equal(_bytes(before[name]), _bytes(after[name])))
    if missing or changed:
        raise AdaptError(f"the drafter run would change the parent's weights ({len(missing)} missing, {len(changed)} "
                         f"changed, e.g. {sorted(missing)[:1] or changed[:1]}); OUTPUT/final was not written")


def _bytes(stored) -> torch.Tensor:
    return stored.load().reshape(-1).view(torch.uint8)


def _parent_dtype(source) -> torch.dtype | None:
    """The dtype of the parent's floating-point tensors as stored (None if mixed)."""
    kinds = {torch_dtype(t.dtype) for shard in read_shards(Path(source)).values() for name, t in shard.items()
             if not name.startswith("drafter.")}
    floats = {d for d in kinds if d.is_floating_point}
    return floats.pop() if len(floats) == 1 else None


def _first_tokens(docs: list[str], tokenizer, length: int, limit: int) -> torch.Tensor:
    rows = []
    for start in range(0, len(docs), 256):
        for ids in tokenizer(docs[start:start + 256])["input_ids"]:
            if len(ids) >= length:
                rows.append(ids[:length])
        if len(rows) >= limit:
            break
    return torch.tensor(rows[:limit], dtype=torch.long).reshape(-1, length)


def chat_prompts(rows: torch.Tensor, tokenizer, message: str) -> Batch:
    """Each row's text in `message` (at `{text}`), as one user turn of the tokenizer's chat template with the
    assistant's turn opened: the tokens `generate --chat` gives the parent, left-padded to the longest."""
    texts = user_turns(tokenizer, [message.replace("{text}", tokenizer.decode(row, skip_special_tokens=True))
                                   for row in rows.tolist()], "data.generate.chat_message")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    width = max(map(len, ids))
    padded = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, row in enumerate(ids):
        padded[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
    return Batch(padded, attention_mask=mask)


def _right_aligned(rows: torch.Tensor, mask: torch.Tensor) -> Batch:
    """Left-padded rows with their padding moved to the end: training rows start with their first real token
    (`draft_cuts` counts from there); the attention mask keeps the padding out."""
    shift = (mask == 0).sum(1)
    index = (torch.arange(rows.shape[1])[None] + shift[:, None]) % rows.shape[1]
    return Batch(rows.gather(1, index), attention_mask=mask.gather(1, index))


# ------------------------------------------------------------------------------------------------ self-distillation

def self_distill(recipe, g) -> tuple[Batch, Batch]:
    """The parent's continuations of the training and validation prompts, generated once into
    OUTPUT/self_distill.safetensors (a resumed run reads them back; other settings are refused)."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = recipe.out / SELF_DISTILL_FILE
    settings = {"prompts": g.prompts, "prompt_length": g.prompt_length, "new_tokens": g.new_tokens,
                "temperature": g.temperature, "validation_prompts": len(recipe.val_data), "seed": recipe.cfg.train.seed}
    if g.chat_message is not None:  # absent otherwise: the rows of a run from before the field stay valid
        settings["chat_message"] = g.chat_message
    settings = json.dumps(settings, sort_keys=True)
    if recipe.main and not path.is_file():
        started = time.perf_counter()
        rows = {}
        for stream, (name, prompts) in enumerate((("train", recipe.train_data), ("validation", recipe.val_data))):
            written = _continue(recipe, prompts, g, stream)
            rows[name] = written.input_ids
            if written.attention_mask is not None:
                rows[name + "_attention_mask"] = written.attention_mask
        tmp = path.with_name(path.name + ".tmp")
        save_file(rows, str(tmp), metadata={"dlm_adapt_generate": settings})
        tmp.rename(path)
        print(f"dlm-adapt: wrote the parent's continuations of {g.prompts} prompts ({g.new_tokens} tokens each) to "
              f"{path} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    recipe.accelerator.wait_for_everyone()
    with safe_open(str(path), "pt") as f:
        written = (f.metadata() or {}).get("dlm_adapt_generate")
    if written != settings:
        raise AdaptError(f"{path} was generated with other data.generate settings ({written}, now {settings}): restore "
                         "them, or start over with overwrite=true")
    rows = load_file(str(path))
    return tuple(_with_continuation(rows[name], rows.get(name + "_attention_mask"), g.new_tokens)
                 for name in ("train", "validation"))


def _with_continuation(ids: torch.Tensor, mask: torch.Tensor | None, new_tokens: int) -> Batch:
    """Self-distilled rows (prompt, the parent's `new_tokens`, padding after them) with `maskable` on the
    continuation: only there does decoding draft, so only there do training and validation (`continuation_starts`)."""
    lengths = mask.sum(1) if mask is not None else torch.full((len(ids),), ids.shape[1])
    column = torch.arange(ids.shape[1])[None]
    maskable = (column >= (lengths - new_tokens)[:, None]) & (column < lengths[:, None])
    return Batch(ids, maskable=maskable, attention_mask=mask)


class _Never(LogitsProcessor):
    """A logits processor: `token` is never produced (transformers' `suppress_tokens` does the same through
    `isin` over the vocabulary at every step, a third of the time of a small model's generation)."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        scores[:, self.token] = -torch.inf
        return scores


@torch.no_grad()
def _continue(recipe, prompts: torch.Tensor, g, stream: int) -> torch.Tensor:
    """The parent's (adapter off, causal) continuations of `prompts`, `g.new_tokens` each, [MASK] never produced
    (as in speculative decoding), EOS not stopping a row (the parent writes on, as it would if asked for more)."""
    dlm = recipe.dlm
    decoder, device = dlm.decoder, recipe.accelerator.device
    was_training = dlm.training
    dlm.eval()
    out = []
    mask = prompts.padding
    with torch.random.fork_rng(devices=[]), dlm._attention(True):  # the run's own random streams stay put
        torch.manual_seed(recipe.cfg.train.seed + stream)
        for start in range(0, len(prompts), g.batch_size):
            part = prompts.input_ids[start:start + g.batch_size].to(device)
            sampled = {"do_sample": True, "temperature": g.temperature, "top_k": None, "top_p": None} \
                if g.temperature > 0 else {"do_sample": False}
            out.append(decoder.generate(part, attention_mask=mask[start:start + g.batch_size].to(device),
                                        max_new_tokens=g.new_tokens, eos_token_id=None,
                                        pad_token_id=dlm.config.mask_token_id, **sampled,
                                        logits_processor=LogitsProcessorList([_Never(dlm.config.mask_token_id)])).cpu())
    dlm.train(was_training)
    rows = torch.cat(out).contiguous()
    if prompts.attention_mask is None:
        return Batch(rows)
    return _right_aligned(rows, torch.cat([mask, torch.ones(len(rows), g.new_tokens, dtype=mask.dtype)], 1))
