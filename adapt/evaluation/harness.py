"""`dlm-adapt eval` / `adapt.evaluate(model, data, ...)`: likelihood, infilling and quality-against-steps for a
diffusion checkpoint, and the same harness for a plain causal LM (its exact NLL, its left-context baseline).

Comparability rule: text becomes the same packed sequences (`adapt.training.data.pack`) for either kind of model,
and the first token of every sequence is context that is never scored. With shift nothing predicts it, and a causal
model has nothing to predict it from; so an ELBO and an AR NLL on the same data score the same
sequences × (seq_length − 1) tokens, each given the same sequence-local information.
"""

import json
import math
import os
from pathlib import Path

import torch

from ..checkpoint import CAUSAL, NOT_A_MODEL, check_device, detect, is_diffusion_model, load
from ..config import DataConfig, EvalOptions, SamplingOptions
from ..deprecations import with_old_keys
from ..training.data import load_documents, pack
from ..errors import AdaptError, first_line
from ..model.block_masked_diffusion import resolve_block_size
from ..training.likelihood import causal_nll, diffusion_elbo, model_device, nll_after
from ..sampling import SamplingError
from ..sources import load_causal

DIFFUSION = "diffusion"  # the other kind is checkpoint.CAUSAL, "causal"


# ------------------------------------------------------------------------------------------------ infill

@torch.no_grad()
def infill(model, sequences: torch.Tensor, *, span: int | None = None, examples: int = 16, batch_size: int = 16,
           ar_scorer=None, ar_name: str | None = None, kv_cache: str | None = None) -> dict:
    """Hide the middle `span` tokens of each sequence and fill them: a diffusion model with its `diffusion_generate`
    (prefix and suffix visible, one token per pass, in its generation config's order: most confident first unless
    it says otherwise; `kv_cache` as there), a causal LM greedily from the prefix alone (the baseline that cannot
    see the suffix). A block-diffusion checkpoint fills the span block by block, each hole seeing its own block on
    both sides and the blocks before it, not later ones. `token_accuracy`: filled tokens equal to the original.
    `ar_parent_nll`: the AR scorer's NLL per token of the span and everything after it, so a fill that does not
    lead into the suffix is penalised too; `reference_ar_parent_nll` is the same on the original text."""
    x = sequences[:examples]
    length = x.shape[1]
    span = span if span is not None else max(1, length // 4)
    if not 1 <= span <= length - 2:
        raise AdaptError(f"infill span must be between 1 and seq_length − 2 ({length - 2}), got {span}")
    start = (length - span) // 2
    device = model_device(model)
    filled = []
    diffusion = _kind(model) == DIFFUSION
    for lo in range(0, x.shape[0], batch_size):
        rows = x[lo:lo + batch_size].to(device)
        if diffusion:
            holes = rows.clone()
            holes[:, start:start + span] = model.config.mask_token_id
            out = _sample(model, holes, max_new_tokens=0, steps=span, kv_cache=kv_cache)
        else:
            out = torch.cat([rows[:, :start], _greedy(model, rows[:, :start], span), rows[:, start + span:]], 1)
        filled.append(out.cpu())
    filled = torch.cat(filled)
    hit = filled[:, start:start + span] == x[:, start:start + span]
    result = {"method": "diffusion" if diffusion else "left_context_greedy", "examples": x.shape[0], "span": span,
              "span_start": start, "token_accuracy": hit.double().mean().item(),
              "span_exact_match": hit.all(1).double().mean().item(), "ar_parent": ar_name,
              "ar_parent_nll": None, "reference_ar_parent_nll": None}
    if ar_scorer is not None:
        result["ar_parent_nll"] = nll_after(ar_scorer, filled, start, batch_size)
        result["reference_ar_parent_nll"] = nll_after(ar_scorer, x, start, batch_size)
    return result


# ------------------------------------------------------------------------------------------- steps sweep

def repeat_task(sequences: torch.Tensor, tokenizer, *, examples: int, length: int, seed: int, mask_id=None,
                repeats: int = 2, pool: int = 64):
    """A copying task with a checkable answer: a random sequence of `length` frequent tokens shown `repeats`
    times (after BOS if the tokenizer has one); the answer is one more repetition. Tokens come from the most
    frequent ordinary tokens of the evaluation text, so they are ones the model has learnt. Returns
    (prompts (examples, P), answers (examples, length))."""
    counts = torch.bincount(sequences.flatten(), minlength=int(sequences.max()) + 1)
    for special in set(tokenizer.all_special_ids) | ({mask_id} if mask_id is not None else set()):
        if special < len(counts):
            counts[special] = 0
    candidates = counts.sort(descending=True, stable=True).indices[: min(pool, int((counts > 0).sum()))]
    if len(candidates) < 2:
        raise AdaptError("the evaluation text has fewer than 2 distinct ordinary tokens: no copying task possible")
    g = torch.Generator().manual_seed(seed)
    answers = candidates[torch.randint(len(candidates), (examples, length), generator=g)]
    prompts = answers.repeat(1, repeats)
    if tokenizer.bos_token_id is not None:
        prompts = torch.cat([torch.full((examples, 1), tokenizer.bos_token_id), prompts], 1)
    return prompts, answers


@torch.no_grad()
def steps_sweep(model, sequences: torch.Tensor, tokenizer, *, length: int = 16, steps: list[int] | None = None,
                examples: int = 32, prompt_tokens: int = 16, batch_size: int = 16, seed: int = 0,
                ar_scorer=None, ar_name: str | None = None, kv_cache: str | None = None) -> dict:
    """Quality against the number of decoding passes for `length` new tokens (one block, temperature 0, the
    generation config's order: most confident first unless it says otherwise; `kv_cache` as in
    `diffusion_generate`). Sequence level: exact match on `repeat_task`; token level: that task's token accuracy and
    the AR scorer's NLL of free continuations of `prompt_tokens`-token prompts from the text. Token quality
    saturates with few steps while whole-sequence correctness needs more (REFERENCE §7): the two error curves
    show that gap. `reference`: the AR scorer (or the causal model evaluated) decoding greedily, one token per
    forward."""
    steps = sorted(set(steps or [2 ** i for i in range(int(math.log2(length)) + 1)]))
    if any(not 1 <= s <= length for s in steps):
        raise AdaptError(f"sweep steps must be between 1 and the sweep length {length}, got {steps}")
    if sequences.shape[1] <= prompt_tokens:
        raise AdaptError(f"sequences of {sequences.shape[1]} tokens are too short for {prompt_tokens}-token prompts")
    diffusion = _kind(model) == DIFFUSION
    task_prompts, answers = repeat_task(sequences, tokenizer, examples=examples, length=length, seed=seed,
                                        mask_id=getattr(model.config, "mask_token_id", None) if diffusion else None)
    free_prompts = sequences[:examples, :prompt_tokens]

    def score(decode) -> dict:
        task = _batched(decode, task_prompts, batch_size)
        free = _batched(decode, free_prompts, batch_size)
        hit = task == answers
        row = {"task_token_accuracy": hit.double().mean().item(), "task_exact_match": hit.all(1).double().mean().item(),
               "ar_parent_nll": None, "distinct_tokens": _distinct(free)}
        if ar_scorer is not None:
            text = torch.cat([free_prompts, free], 1)
            row["ar_parent_nll"] = nll_after(ar_scorer, text, prompt_tokens, batch_size)
        return row

    points = []
    if diffusion:
        for s in steps:
            points.append({"steps": s, "tokens_per_step": length / s,
                           **score(lambda p, s=s: _sample(model, p, max_new_tokens=length, steps=s,
                                                          kv_cache=kv_cache)[:, p.shape[1]:])})
    reference_model = model if not diffusion else ar_scorer
    reference = None
    if reference_model is not None:
        reference = {"method": "ar_greedy", "model": ar_name if diffusion else "self",
                     **score(lambda p: _greedy(reference_model, p, length))}
    return {"task": "repeat", "length": length, "examples": examples, "prompt_tokens": prompt_tokens,
            "ar_parent": ar_name, "points": points, "reference": reference}


def plot_steps_sweep(sweep: dict, path: str | Path, title: str = "") -> Path:
    """Two panels: task token error and sequence error against steps; AR-parent NLL of free text against steps.
    Dashed lines: the AR reference."""
    plt = _pyplot()
    points, ref = sweep["points"], sweep["reference"]
    steps = [p["steps"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(steps, [1 - p["task_token_accuracy"] for p in points], "o-", color="tab:blue",
              label="token error (1 − token accuracy)")
    left.plot(steps, [1 - p["task_exact_match"] for p in points], "s-", color="tab:red",
              label="sequence error (1 − exact match)")
    if ref is not None:
        left.axhline(1 - ref["task_token_accuracy"], color="tab:blue", ls="--", lw=1, label="AR greedy, token")
        left.axhline(1 - ref["task_exact_match"], color="tab:red", ls="--", lw=1, label="AR greedy, sequence")
    left.set_ylim(-0.03, 1.03)
    left.set_ylabel("error rate")
    left.set_title(f"repeat task, {sweep['length']} tokens, {sweep['examples']} examples")
    nll = [p["ar_parent_nll"] for p in points]
    if any(v is not None for v in nll):
        right.plot(steps, nll, "o-", color="tab:green", label="diffusion")
    if ref is not None and ref["ar_parent_nll"] is not None:
        right.axhline(ref["ar_parent_nll"], color="tab:green", ls="--", lw=1, label="AR greedy")
    if not any(v is not None for v in nll) and (ref is None or ref["ar_parent_nll"] is None):
        right.text(0.5, 0.5, "no AR parent to score with", ha="center", transform=right.transAxes)
    right.set_ylabel("AR-parent NLL of generated tokens (nats)")
    right.set_title(f"free continuation, {sweep['length']} tokens")
    for ax in (left, right):
        if steps:
            ax.set_xscale("log", base=2)
            ax.set_xticks(steps, [str(s) for s in steps])
        ax.set_xlabel("decoding steps (forward passes)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise AdaptError("--plot needs matplotlib: pip install 'dlm-adapt[eval]'") from e
    return plt


# ---------------------------------------------------------------------------------------------- evaluate

IS_CAUSAL_ON_CAUSAL = "--is-causal scores a diffusion checkpoint as its causal self; a causal LM already is one"
KV_CACHE_ON_CAUSAL = "--kv-cache is a diffusion checkpoint's decoding option; a causal LM has none to set"
BLOCKS_ON_CAUSAL = "--block-size scores a diffusion checkpoint block-wise; a causal LM has no blocks"


def evaluate(model, data: str | None = None, *, tokenizer=None, **options) -> dict:
    """Evaluate a diffusion checkpoint or a causal LM on held-out text; returns the dict `dlm-adapt eval` prints
    (and writes to `json`, when given).

    `model`: a dlm-adapt checkpoint, a Hugging Face causal LM directory, a `.gguf` file, a Hub id, or a loaded
    model (then pass `tokenizer`). `data` and `options` are the fields of `adapt.config.EvalOptions`, documented
    there: the text is packed into sequences of `seq_length` tokens and the first `num_sequences` are scored with
    `metrics` (a list or a comma-separated string of elbo, infill, steps_sweep). With `tasks`, the model also
    runs lm-evaluation-harness tasks (`run_tasks`); `data` is then optional."""
    o = EvalOptions(data=data, **options)
    if o.json:
        check_writable(o.json)  # before minutes of evaluation, not after
    if o.device is not None:
        check_device(o.device)
    name = str(model) if isinstance(model, (str, Path)) else type(model).__name__
    spec = _model_spec(model) if isinstance(model, (str, Path)) else None  # bad paths fail before data is read
    if o.tasks:
        _lm_eval_backend()  # a missing eval extra fails before anything loads
    if o.plot is not None:
        _pyplot()  # and so does a missing matplotlib, rather than after the sweep
    documents = None
    if o.data is not None:
        documents = _quietly(load_documents, o.data, DataConfig(text_column=o.text_column, sample_by=o.sample_by,
                                                              hub_split=o.split, hub_config=o.hub_config))
        if not documents:
            raise AdaptError(f"dataset {o.data} holds no text")
    if spec is not None:
        _check_against_config(spec, o, documents is not None)  # what config.json alone rules out
        model, tokenizer = _load(spec, o.device)
    elif tokenizer is None:
        raise AdaptError("pass the tokenizer with a loaded model")
    elif o.device is not None:
        model.to(o.device)
    kind = _kind(model)
    if o.kv_cache is not None and kind != DIFFUSION:
        raise AdaptError(KV_CACHE_ON_CAUSAL)
    result_note = None
    if o.block_size is not None:
        if kind != DIFFUSION:
            raise AdaptError(BLOCKS_ON_CAUSAL)
        trained = resolve_block_size(model.config)
        if trained != o.block_size:  # labelled: the number is not the bound the checkpoint was trained for
            result_note = (f"scored with block size {o.block_size}; the checkpoint was trained "
                           + ("full-sequence" if trained is None else f"with block size {trained}"))
    if o.is_causal and kind != DIFFUSION:  # a loaded model
        raise AdaptError(IS_CAUSAL_ON_CAUSAL)
    if documents is None:
        result = {"model": name, "kind": kind, "seed": o.seed, "lm_eval": run_tasks(model, tokenizer, kind, o)}
        if o.json:
            write_json(result, o.json)
        return result
    limit = _max_positions(model)
    if limit is not None and o.seq_length > limit:
        raise AdaptError(f"seq_length {o.seq_length} exceeds the model's {limit} positions")
    sequences = pack(documents, tokenizer, o.seq_length, "evaluation", max_rows=o.num_sequences)
    result = {"model": name, "kind": kind, "data": str(o.data), "seq_length": o.seq_length,
              "sequences": sequences.shape[0], "seed": o.seed, "metrics": list(o.metrics)}
    if result_note:
        result["block_size_note"] = result_note
    scorer, scorer_name = None, None
    if "infill" in o.metrics or "steps_sweep" in o.metrics:
        scorer, scorer_name = _ar_scorer(model, kind, o.ar_parent, o.device)
    try:
        if "elbo" in o.metrics:
            result["elbo"] = (diffusion_elbo(model, sequences, mc_samples=o.mc_samples, batch_size=o.batch_size,
                                             seed=o.seed, block_size=o.block_size)
                              if kind == DIFFUSION else causal_nll(model, sequences, batch_size=o.batch_size))
            result["elbo"] = with_old_keys(result["elbo"], "eval result JSON key")
        if "infill" in o.metrics:
            result["infill"] = infill(model, sequences, span=o.infill_span, examples=o.infill_examples,
                                      batch_size=o.batch_size, ar_scorer=scorer, ar_name=scorer_name, kv_cache=o.kv_cache)
        if "steps_sweep" in o.metrics:
            result["steps_sweep"] = steps_sweep(model, sequences, tokenizer, length=o.sweep_length, steps=o.sweep_steps,
                                                examples=o.sweep_examples, batch_size=o.batch_size, seed=o.seed,
                                                prompt_tokens=min(16, o.seq_length // 2), ar_scorer=scorer,
                                                ar_name=scorer_name, kv_cache=o.kv_cache)
    except SamplingError as e:
        raise AdaptError(str(e)) from e
    if o.tasks:
        result["lm_eval"] = run_tasks(model, tokenizer, kind, o)
    if o.plot is not None:
        result["plot"] = str(plot_steps_sweep(result["steps_sweep"], o.plot, title=f"{name} ({kind})"))
    result = with_old_keys(result, "eval result JSON key")  # "block_length" and "blocks" until their removal
    if o.json:
        write_json(result, o.json)
    return result


def _lm_eval_backend():
    try:
        from . import lm_eval_backend
    except ImportError as e:
        raise AdaptError(f"--tasks needs lm-eval ({e}): pip install 'dlm-adapt[eval]'") from None
    return lm_eval_backend


def run_tasks(model, tokenizer, kind: str, o: EvalOptions) -> dict:
    """lm-eval's `simple_evaluate` on `o.tasks` with the dlm-adapt backend (a causal LM: lm-eval's `hf`), from the
    same options as the rest of `dlm-adapt eval` (mc_samples, batch_size, seed, block_size, kv_cache). Returns
    lm-eval's per-task metrics; with `o.json`, lm-eval's whole results JSON is written beside it
    (OUT.lm_eval.json)."""
    backend = _lm_eval_backend()
    import lm_eval
    from lm_eval.tasks import TaskManager

    if kind == DIFFUSION:
        lm = backend.DLMAdaptLM(pretrained=model, tokenizer=tokenizer, mc_samples=o.mc_samples,
                                batch_size=o.batch_size, seed=o.seed, block_size=o.block_size,
                                is_causal=o.is_causal, kv_cache=o.kv_cache)
    else:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=o.batch_size)
    manager = TaskManager(include_path=o.include_path, include_defaults=False) if o.include_path else None
    if manager is None or any(t not in manager.all_tasks for t in o.tasks):  # indexing lm-eval's own takes seconds
        manager = TaskManager(include_path=o.include_path)
    unknown = [t for t in o.tasks if t not in manager.all_tasks]
    if unknown:
        raise AdaptError(f"unknown lm-eval task {', '.join(unknown)}; list them with `lm_eval ls tasks`"
                         + (f" (and tasks under {o.include_path})" if o.include_path else
                            ", or add a directory of task YAMLs with --include-path"))
    limit = int(o.limit) if o.limit is not None and o.limit >= 1 else o.limit
    results = _quietly(lambda: lm_eval.simple_evaluate(
        model=lm, tasks=list(o.tasks), num_fewshot=o.num_fewshot, limit=limit, task_manager=manager,
        log_samples=False, random_seed=o.seed, numpy_random_seed=o.seed, torch_random_seed=o.seed,
        fewshot_random_seed=o.seed))
    out = {"tasks": list(o.tasks), "limit": o.limit, "results": results["results"]}
    if o.json:
        path = Path(o.json)
        out["json"] = str(write_json(json.loads(json.dumps(results, default=str)),
                                     path.with_name(path.stem + ".lm_eval.json")))
    return out


def _quietly(fn, *args):
    """`datasets` progress bars off for the call: on stderr they bury the one-line error and the JSON."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return fn(*args)
    finally:
        if enabled:
            datasets.enable_progress_bars()


def check_writable(path: str | Path):
    """Refuse an output file that could not be written, without creating anything."""
    path = Path(path)
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if path.is_dir():
        raise AdaptError(f"--json {path} is a directory; name a file")
    if not parent.is_dir() or not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise AdaptError(f"--json {path} cannot be written (no permission, or {parent} is not a directory); "
                         "choose another path")


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ models

def _model_spec(model) -> tuple[str, str, str | None, int | None]:
    """(kind, path, gguf_file, positions) from the files alone, before any weights are read."""
    found = detect(model)
    path = Path(model).expanduser()
    if path.is_dir() and not found.has_config:
        raise AdaptError(f"{path} is neither a dlm-adapt checkpoint nor a causal LM: it has no config.json")
    if path.is_dir() and found.error is not None:
        raise AdaptError(f"{path / 'config.json'} is not a valid JSON config ({found.error})") from found.error
    if found.kind == NOT_A_MODEL and found.error is not None:  # a Hub id without a config to be had
        raise AdaptError(f"cannot load model {model}: {first_line(found.error)}") from found.error
    if found.kind == NOT_A_MODEL:
        raise AdaptError(f"model {model} not found (expected a checkpoint directory, a .gguf file or a Hub id)")
    config = found.config or {}
    text = config.get("text_config") or config
    positions = text.get("max_position_embeddings") or text.get("n_positions")
    return (CAUSAL if found.kind == CAUSAL else DIFFUSION), found.path, found.gguf_file, positions


def _check_against_config(spec, o: EvalOptions, documents: bool):
    kind, _, _, positions = spec
    if o.is_causal and kind != DIFFUSION:
        raise AdaptError(IS_CAUSAL_ON_CAUSAL)
    if o.kv_cache is not None and kind != DIFFUSION:
        raise AdaptError(KV_CACHE_ON_CAUSAL)
    if o.block_size is not None and kind != DIFFUSION:
        raise AdaptError(BLOCKS_ON_CAUSAL)
    if documents and positions is not None and o.seq_length > positions:
        raise AdaptError(f"seq_length {o.seq_length} exceeds the model's {positions} positions")


def _load(spec, device):
    kind, path, gguf, _ = spec
    if kind == DIFFUSION:
        return load(path, device=device)
    return _load_causal(path, gguf, device)


def _load_causal(path: str, gguf: str | None, device, local_files_only: bool = False):
    try:
        causal = load_causal(path, gguf_file=gguf, device=device, local_files_only=local_files_only)
    except AdaptError as e:
        raise AdaptError(f"{path} is neither a dlm-adapt diffusion checkpoint nor a causal LM transformers can load: "
                         f"{e}") from e
    return causal.model, causal.tokenizer


def _ar_scorer(model, kind: str, ar_parent, device):
    """(causal LM that scores generated text, its name): `ar_parent` if given; for a diffusion model its
    `provenance.source` when that loads from local files; for a causal model, itself."""
    if ar_parent is not None and not isinstance(ar_parent, (str, Path)):
        return ar_parent, type(ar_parent).__name__
    if ar_parent is not None:
        p = Path(ar_parent).expanduser()
        gguf = p.name if p.is_file() and p.suffix == ".gguf" else None
        if not p.exists():
            raise AdaptError(f"--ar-parent {ar_parent} not found")
        scorer, _ = _load_causal(str(p.parent) if gguf else str(p), gguf, device)
        return scorer, str(ar_parent)
    if kind == CAUSAL:
        return model, "self"
    provenance = getattr(model.config, "provenance", None) or {}
    source = provenance.get("source")
    if not source:
        return None, None
    p = Path(source).expanduser()
    gguf = provenance.get("gguf_file")
    if p.is_file() and p.suffix == ".gguf":
        p, gguf = p.parent, p.name
    try:  # a Hub id counts only when it is already in the local cache: evaluation never downloads a parent
        scorer, _ = _load_causal(str(p) if p.exists() else source, gguf, device, local_files_only=not p.exists())
    except AdaptError:
        return None, None
    return scorer, source


def _kind(model) -> str:
    return DIFFUSION if is_diffusion_model(model) else CAUSAL


def _max_positions(model) -> int | None:
    config = model.config
    text = getattr(config, "text_config", None) or config
    return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)


# ------------------------------------------------------------------------------------------------ decode

def _sample(model, ids, *, max_new_tokens: int, steps: int, kv_cache: str | None):
    """The model's own `diffusion_generate` at temperature 0, one block, no early stop at EOS (the checks compare
    fixed-length outputs); the rest as its generation config says."""
    options = SamplingOptions(max_new_tokens=max_new_tokens, steps=steps, kv_cache=kv_cache)
    return model.diffusion_generate(ids.to(model_device(model)), stop_at_eos=False, **options.kwargs())


@torch.no_grad()
def _greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """n greedy tokens from a causal LM, EOS included as an ordinary token (spans of packed text contain EOS)."""
    ids = prompt.to(model_device(model))
    for _ in range(n):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[:, prompt.shape[1]:].to(prompt.device)


def _batched(decode, prompts: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([decode(prompts[i:i + batch_size]).cpu() for i in range(0, prompts.shape[0], batch_size)])


def _distinct(tokens: torch.Tensor) -> float:
    return sum(len(set(row.tolist())) / len(row) for row in tokens) / len(tokens)
