"""`dlm-adapt eval` / `adapt.evaluate(model, data, ...)`: likelihood, infilling and quality-against-steps for a
diffusion checkpoint, and the same harness for a plain causal LM (its exact NLL, its left-context baseline).

Comparability rule: text becomes the same packed sequences (`adapt.training.data.pack`) for either kind of model,
and the first token of every sequence is context that is never scored. With shift nothing predicts it, and a causal
model has nothing to predict it from; so an ELBO and an AR NLL on the same data score the same
sequences × (seq_length − 1) tokens, each given the same sequence-local information.
"""

import json
import os
from pathlib import Path

from ..checkpoint import CAUSAL, NOT_A_MODEL, check_device, detect, load
from ..config import DataConfig, EvalOptions
from ..training.data import document_separator, load_documents, pack
from ..errors import AdaptError, first_line
from ..model.block_masked_diffusion import resolve_block_size
from ..training.forgetting import forgetting
from ..training.likelihood import causal_nll, diffusion_elbo
from ..sampling import SamplingError
from ..sources import load_causal
from .decoding import DIFFUSION, infill, kind_of, load_pyplot, plot_steps_sweep, steps_sweep

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
        load_pyplot()  # and so does a missing matplotlib, rather than after the sweep
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
    kind = kind_of(model)
    note = _check_against_model(model, kind, o)
    if documents is None:
        result = {"model": name, "kind": kind, "seed": o.seed, "lm_eval": run_tasks(model, tokenizer, kind, o)}
    else:
        result = _score_text(model, tokenizer, kind, documents, o, name, note)
    if o.json:
        write_json(result, o.json)
    return result


def _check_against_model(model, kind: str, o: EvalOptions) -> str | None:
    """What the loaded model rules out; returns the note a block size other than the trained one puts on the result."""
    if o.kv_cache is not None and kind != DIFFUSION:
        raise AdaptError(KV_CACHE_ON_CAUSAL)
    note = None
    if o.block_size is not None:
        if kind != DIFFUSION:
            raise AdaptError(BLOCKS_ON_CAUSAL)
        trained = resolve_block_size(model.config)
        if trained != o.block_size:  # labelled: the number is not the bound the checkpoint was trained for
            note = (f"scored with block size {o.block_size}; the checkpoint was trained "
                    + ("full-sequence" if trained is None else f"with block size {trained}"))
    if o.is_causal and kind != DIFFUSION:  # a loaded model
        raise AdaptError(IS_CAUSAL_ON_CAUSAL)
    return note


def _score_text(model, tokenizer, kind: str, documents: list[str], o: EvalOptions, name: str,
                note: str | None) -> dict:
    """`o.metrics` on the packed sequences of `documents` (then lm-eval's tasks and the plot, if asked)."""
    limit = _max_positions(model)
    if limit is not None and o.seq_length > limit:
        raise AdaptError(f"seq_length {o.seq_length} exceeds the model's {limit} positions")
    # a checkpoint trained with data.separator records it: its ELBO is scored on text packed the same way
    separator = o.separator if o.separator is not None else getattr(model.config, "document_separator", None)
    sequences = pack(documents, tokenizer, o.seq_length, "evaluation", max_rows=o.num_sequences,
                     separator=separator)
    result = {"model": name, "kind": kind, "data": str(o.data), "seq_length": o.seq_length,
              "sequences": sequences.shape[0], "seed": o.seed, "metrics": list(o.metrics)}
    if separator is not None:
        result["separator"] = separator
    if note:
        result["block_size_note"] = note
    scorer, scorer_name = None, None
    if "infill" in o.metrics or "steps_sweep" in o.metrics or "forgetting" in o.metrics:
        scorer, scorer_name = _ar_scorer(model, kind, o.ar_parent, o.device)
    try:
        if "elbo" in o.metrics:
            result["elbo"] = (diffusion_elbo(model, sequences, mc_samples=o.mc_samples, batch_size=o.batch_size,
                                             seed=o.seed, block_size=o.block_size)
                              if kind == DIFFUSION else causal_nll(model, sequences, batch_size=o.batch_size))
        if "forgetting" in o.metrics:
            result["forgetting"] = _forgetting(model, kind, sequences, o, scorer, scorer_name,
                                               document_separator(tokenizer, separator)[1])
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
    return result


def _forgetting(model, kind: str, sequences, o: EvalOptions, parent, parent_name, separator: int) -> dict:
    """`training.forgetting` for a block-diffusion checkpoint, beside its AR parent's numbers when one loads, and
    again within documents (without the packing's `separator` tokens and the token after each)."""
    if kind != DIFFUSION or resolve_block_size(model.config, o.block_size) is None:
        raise AdaptError("--metrics forgetting compares a block-diffusion checkpoint's block-start tokens with its "
                         "parent's: this model has no blocks (give --block-size, or drop forgetting)")
    result = forgetting(model, sequences, batch_size=o.batch_size, seed=o.seed, block_size=o.block_size,
                        parent=parent if parent is not model else None, separator=separator)
    return {**result, "parent": parent_name}


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


def _max_positions(model) -> int | None:
    config = model.config
    text = getattr(config, "text_config", None) or config
    return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
