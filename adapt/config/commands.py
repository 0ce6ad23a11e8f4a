"""Options of the commands (convert, generate, eval, push, upgrade, serve): one documented dataclass each.

`dlm-adapt` builds its flags and `--help` from these fields with `transformers.HfArgumentParser`, and the Python
functions take the same names as keywords. A field's `help` is its documentation. `None` means "not chosen": the
function decides (for sampling: the checkpoint's generation_config.json, then `diffusion_generate`'s default).
Positional arguments (model, source, output, directory) are the functions' own and are not here."""

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from ..errors import AdaptError
from ..ranges import FieldError, check_ranges

METRICS = ("elbo", "infill", "steps_sweep", "forgetting")
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # torch dtypes by name (`recipes.DTYPES`)


class SamplerChoices(Sequence):
    """Choices that are a table of the sampler (`REMASKING`, `KV_CACHES`), read when argparse first looks at them:
    the sampler imports torch, which parsing `dlm-adapt convert ...` or `--help` should not wait for."""

    def __init__(self, table: str):
        self.table = table

    def _values(self) -> tuple:
        from ..model import sampling_masked_diffusion as sampling

        return getattr(sampling, self.table)

    def __getitem__(self, i):
        return self._values()[i]

    def __len__(self):
        return len(self._values())


def _help(text: str, **more) -> dict:
    return {"metadata": {"help": text, **more}}


class Names(tuple):
    """Comma-separated on the command line ("elbo,infill"), a tuple in Python (a list or a string is accepted)."""

    def __new__(cls, value=()):
        if isinstance(value, str):
            value = value.split(",")
        return super().__new__(cls, (cls.item(v.strip() if isinstance(v, str) else v) for v in value
                                     if not (isinstance(v, str) and not v.strip())))

    item = staticmethod(str)


class Texts(tuple):
    """A repeatable text flag (`--prompt a --prompt b`): each flag adds one text, commas and all."""

    def __new__(cls, value=()):
        return super().__new__(cls, [value] if isinstance(value, str) else value)


class Ints(Names):
    """Comma-separated integers on the command line ("1,2,4")."""

    item = staticmethod(int)


@dataclass
class SourceOptions:
    """How a causal source becomes a diffusion checkpoint, wherever it is converted: `dlm-adapt convert`
    (`ConvertOptions`) and a recipe's `model:` section (`recipes.ModelConfig`, used when `model.path` is a causal
    source, converted into OUTPUT/converted first)."""

    mask_token: str = field(default="auto", **_help(
        "'auto' (an existing mask token, else a spare embedding row, else a new <|mask|>), a token in the "
        "vocabulary, or a token id"))
    shift: bool = field(default=True, **_help("keep the AR alignment: logit i-1 predicts token i"))
    gguf_file: str | None = field(default=None, **_help("GGUF file name inside SOURCE (a directory or Hub repo)"))

    def source_options(self) -> dict:
        """These fields alone, as `adapt.convert`'s keywords (a subclass's other fields dropped)."""
        return {f.name: getattr(self, f.name) for f in fields(SourceOptions)}


@dataclass
class ConvertOptions(SourceOptions):
    """`dlm-adapt convert SOURCE OUTPUT` = `adapt.convert(source, output, **options)`."""

    dtype: Literal[("auto", *DTYPE_NAMES)] = field(default="auto", **_help(
        "weight dtype of the output ('auto': the source's)"))
    revision: str | None = field(default=None, **_help("Hub revision (branch, tag or commit) of SOURCE"))
    trust_remote_code: bool = field(default=False, **_help(
        "allow the source's own Python code for its config and tokenizer"))
    overwrite: bool = field(default=False, **_help("replace OUTPUT if dlm-adapt wrote it"))
    block_size: int | None = field(default=None, **_help(
        "write a block-diffusion checkpoint: attention bidirectional inside blocks of this many tokens, causal "
        "between them (BD3-LM); also generation_config.json's block_length (default: full-sequence diffusion)"))
    drafter: bool = field(default=False, **_help(
        "write a drafter checkpoint for speculative decoding (needs --block-size K): the parent's weights untouched "
        "plus an untrained drafter adapter (LoRA + [MASK] row); `generate --speculative` drafts K tokens with it"))
    drafter_rank: int = field(default=16, **_help("the drafter adapter's LoRA rank"))
    drafter_alpha: float | None = field(default=None, **_help("its LoRA alpha (update x alpha / rank; default 2 x rank)"))
    drafter_targets: Names | None = field(default=None, metadata={"metavar": "NAMES", "help": (
        "the projections it acts on, comma-separated, e.g. gate_proj,up_proj,down_proj (default: every linear layer "
        "but the LM head and MoE routers); fewer make a drafting forward cheaper")})

    def __post_init__(self):
        if self.drafter and self.block_size is None:
            raise AdaptError("--drafter drafts blocks: give the draft block size with --block-size K (e.g. 4)")
        r = self.drafter_rank
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise AdaptError(f"drafter rank must be a positive integer, got {r!r}")
        check_ranges(self, {"drafter_alpha": "(0, inf)"})  # the targets are checked against the model's projections
        b = self.block_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise AdaptError(f"block size must be a positive integer, got {b!r}")
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:  # the Python API does not check the Literal
            raise AdaptError(f"unknown dtype '{self.dtype}': use auto, {', '.join(DTYPE_NAMES)}")


@dataclass
class SamplingOptions:
    """The decoding settings, carried from the command line (`generate`'s flags), the Python API (`adapt.generate`'s
    keywords), the lm-eval backend and a server to the sampler. Unset (None) fields are left to the checkpoint's
    generation_config.json, else the sampler's default; `kwargs()` is the one place they become
    `model.diffusion_generate`'s keywords (the remote code's public API, which takes plain keywords)."""

    max_new_tokens: int | None = field(default=None, **_help(
        "tokens to generate (default: generation_config.json, which then decides --steps and --block-length too; "
        "128 for a fresh conversion)"))
    steps: int | None = field(default=None, **_help(
        "forward passes (default: --max-new-tokens when it is given, else generation_config.json)"))
    block_length: int | None = field(default=None, **_help(
        "semi-autoregressive decoding block (default: one block when --max-new-tokens is given, else "
        "generation_config.json)"))
    remasking: str | None = field(default=None, **_help(
        "which masked positions to commit first: %(choices)s (default: generation_config.json, else "
        "low_confidence)", choices=SamplerChoices("REMASKING"), metavar="ORDER"))
    threshold: float | None = field(default=None, **_help(
        "parallel decoding: commit every position whose probability is at least this"))
    entropy_bound: float | None = field(default=None, **_help(
        "parallel decoding (EB-sampler): commit the longest run of best-ranked positions whose entropies sum to at "
        "most this (nats) beyond their largest", metavar="GAMMA"))
    sub_block: int | None = field(default=None, **_help(
        "block-diffusion checkpoints: commit each block's tokens this many at a time, left to right (Fast-dLLM "
        "v2's sub-blocks; must divide the block size)"))
    temperature: float | None = field(default=None, **_help("sampling temperature (default: 0, greedy)"))
    top_k: int | None = field(default=None, **_help("keep the k most likely tokens"))
    top_p: float | None = field(default=None, **_help("keep the smallest set of tokens with this probability"))
    min_new_tokens: int | None = field(default=None, **_help("forbid EOS before this many new tokens (default: 0)"))
    kv_cache: str | None = field(default=None, **_help(
        "Fast-dLLM's approximate KV cache, refreshed once per block: later passes rerun the block and what "
        "follows it (prefix) or only the block (dual)", choices=SamplerChoices("KV_CACHES"), metavar="CACHE"))
    speculative: bool = field(default=False, **_help(
        "speculative decoding (a drafter checkpoint): one forward per round, in which the causal "
        "parent verifies the last drafts and the drafter drafts the next ones, so the output is the parent's own "
        "(greedy: its greedy text)"))
    draft_length: int | None = field(default=None, **_help(
        "--speculative: tokens drafted per round (default: the checkpoint's block size)"))
    guess_bonus: bool = field(default=True, **_help(
        "--speculative: where the parent may reject a draft, guess its own token (the drafter's runner-up) and "
        "draft after the guess too; a right guess commits one token more, the parent's next, from the same forward "
        "(--no-guess-bonus: off)"))

    def kwargs(self) -> dict:
        """`diffusion_generate`'s keywords: the chosen options only, so the checkpoint decides the rest."""
        chosen = {f.name: getattr(self, f.name) for f in fields(SamplingOptions)
                  if getattr(self, f.name) is not None and f.name not in ("speculative", "guess_bonus")}
        if not self.guess_bonus:  # on is the sampler's default (and older checkpoints' code takes no such keyword)
            chosen["guess_bonus"] = False
        return dict(chosen, speculative=True) if self.speculative else chosen

    def sampling(self) -> "SamplingOptions":
        """These options alone (a subclass's other fields dropped)."""
        return SamplingOptions(**{f.name: getattr(self, f.name) for f in fields(SamplingOptions)})


@dataclass
class GenerateOptions(SamplingOptions):
    """`dlm-adapt generate MODEL`: prompts, then the decoding settings (`SamplingOptions`, whose fields come first
    here). `adapt.generate` takes the same names as keywords."""

    prompt: Texts | None = field(default=None, **_help(
        "prompt text (repeatable; all prompts decode as one left-padded batch)", action="append"))
    prompts_file: str | None = field(default=None, **_help("a UTF-8 file with one prompt per line"))
    chat: bool = field(default=False, **_help("wrap each prompt in the tokenizer's chat template"))
    infill: str | None = field(default=None, **_help(
        "text whose mask-token strings (e.g. <|mask|>) are holes to fill", metavar="TEXT"))
    seed: int | None = field(default=None, **_help("seed of the sampling generator"))
    show_steps: bool = field(default=False, **_help("print the canvas after every step (stderr)"))
    stream: bool = field(default=False, **_help(
        "print each block's text as soon as it is final (prompts decode one at a time)"))
    json: bool = field(default=False, **_help("one JSON object per prompt: text, tokens, nfe, ..."))

    def __post_init__(self):  # `--prompt a --prompt b` arrives as [Texts(a), Texts(b)]
        self.prompt = Texts(p for group in self.prompt or () for p in Texts(group))


def _sampling_field(name: str):
    """`SamplingOptions`' field `name` (default and help) for a dataclass that takes some of the decoding settings."""
    f = SamplingOptions.__dataclass_fields__[name]
    return field(default=f.default, metadata=f.metadata)


@dataclass
class LmEvalModelArgs:
    """`--model dlm-adapt --model_args pretrained=DIR,...` (lm-evaluation-harness) = `DLMAdaptLM(**args)`. lm-eval
    hands them as a mapping whose values it has typed itself; strings left over ("16", "True") are parsed as YAML,
    and everything is checked as a recipe is (`parsing.from_dict`). The decoding settings are `SamplingOptions`'
    fields; `generate_until` adds each request's own (until, max_gen_toks, temperature, ...)."""

    pretrained: Any = field(default=None, **_help("a dlm-adapt checkpoint (directory or Hub id), or a loaded model"))
    tokenizer: Any = field(default=None, **_help("the tokenizer, with a loaded model"))
    mc_samples: int = field(default=64, **_help("Monte-Carlo draws per request for the ELBO"))
    batch_size: int = field(default=16, **_help("forward rows per pass, e.g. 16 (not 'auto')"))
    seed: int = field(default=0, **_help("seed of the Monte-Carlo draws"))
    block_size: int | None = field(default=None, **_help("score the ELBO block-wise (default: the checkpoint's)"))
    is_causal: bool = field(default=False, **_help("score the checkpoint as its causal self (the exact AR NLL)"))
    steps: int | None = _sampling_field("steps")
    block_length: int | None = _sampling_field("block_length")
    threshold: float | None = _sampling_field("threshold")
    kv_cache: str | None = _sampling_field("kv_cache")
    remasking: str | None = _sampling_field("remasking")
    device: str | None = field(default=None, **_help("e.g. cpu, cuda:0 (default: where the model loads)"))
    dtype: Literal[("auto", *DTYPE_NAMES)] | None = field(default=None, **_help("weight dtype (default: as saved)"))
    max_length: int | None = field(default=None, **_help(
        "tokens per request, context included (default: the model's positions)"))
    max_batch_size: Any = field(default=None, **_help("lm-eval's own; batches are fixed groups of requests"))

    def __post_init__(self):
        if self.pretrained is None:
            raise AdaptError("--model_args needs pretrained=DIR, a dlm-adapt checkpoint (directory or Hub id)")
        check_ranges(self, {"mc_samples": "[1, inf)", "batch_size": "[1, inf)", "block_size": "[1, inf)",
                            "steps": "[1, inf)", "block_length": "[1, inf)"})
        if self.max_length is not None and self.max_length < 2:
            raise FieldError("max_length", "must be at least 2 (one token of context, one scored)")
        from ..model.sampling_masked_diffusion import SamplingError, check_sampling_options

        try:
            check_sampling_options(threshold=self.threshold, kv_cache=self.kv_cache, remasking=self.remasking)
        except SamplingError as e:
            raise AdaptError(str(e)) from None

    def sampling(self) -> SamplingOptions:
        """The decoding settings among these args."""
        return SamplingOptions(**{f: getattr(self, f) for f in ("steps", "block_length", "threshold", "kv_cache",
                                                                   "remasking")})


@dataclass
class EvalOptions:
    """`dlm-adapt eval MODEL --data DATA` = `adapt.evaluate(model, data, **options)`."""

    data: str | None = field(default=None, **_help(
        "a .txt/.json/.jsonl/.parquet file (comma-separated for several) or a Hub dataset name (needed unless "
        "--tasks is given)"))
    metrics: Names = field(default=Names("elbo"), **_help(
        f"comma-separated, any of {', '.join(METRICS)} (forgetting: a block-diffusion checkpoint's block-start and "
        "AR-mode NLLs beside its AR parent's, over the whole text and within documents; README, `dlm-adapt eval`)",
        metavar="M1,M2"))
    mc_samples: int = field(default=16, **_help("Monte-Carlo draws per sequence for the ELBO"))
    ar_parent: str | None = field(default=None, **_help(
        "causal LM that scores generated text, and the parent `forgetting` compares with (default: the "
        "checkpoint's provenance.source, if it loads from local files)"))
    seq_length: int | None = field(default=None, **_help("tokens per packed sequence (default: 128)"))
    num_sequences: int | None = field(default=None, **_help(
        "packed sequences evaluated, from the start of the data (default: 64)"))
    separator: str | None = field(default=None, **_help(
        "a token put after each packed document instead of the tokenizer's own marks (BOS first, or EOS after): "
        "the one the model was trained with (its recipe's data.separator), e.g. '<|endoftext|>'", metavar="TOKEN"))
    batch_size: int = field(default=16, **_help("sequences per forward pass"))
    seed: int = field(default=0, **_help("seed of the Monte-Carlo draws and of the sweep's tasks"))
    device: str | None = field(default=None, **_help("e.g. cpu, cuda, cuda:1 (default: where the model loads)"))
    text_column: str = field(default="text", **_help("text field of json/jsonl/parquet/Hub data"))
    sample_by: Literal["line", "paragraph", "document"] = field(default="paragraph", **_help(
        "how a .txt file splits into documents (paragraph: blank-line-separated)"))
    split: str = field(default="validation", **_help("Hub dataset split"))
    hub_config: str | None = field(default=None, **_help("Hub dataset configuration name"))
    infill_span: int | None = field(default=None, **_help(
        "tokens hidden in the middle of each sequence (default: a quarter of the sequence)"))
    infill_examples: int = field(default=16, **_help("sequences used for infilling"))
    sweep_length: int = field(default=16, **_help("tokens generated in the steps sweep"))
    sweep_steps: Ints | None = field(default=None, **_help(
        "comma-separated step counts, each from 1 to --sweep-length (default: 1, 2, 4, ... up to --sweep-length); a "
        "count that does not divide the length commits the tokens as evenly as it can (3 steps of 16: 6, 5, 5)",
        metavar="N1,N2"))
    sweep_examples: int = field(default=32, **_help("task examples and prompts in the sweep"))
    json: str | None = field(default=None, **_help("also write the result to this file", metavar="OUT.json"))
    plot: str | None = field(default=None, **_help(
        "plot the steps sweep (needs matplotlib: the eval extra)", metavar="OUT.png"))
    block_size: int | None = field(default=None, **_help(
        "score the ELBO block-wise with this block size (default: the checkpoint's; a full-sequence checkpoint "
        "is then scored semi-autoregressively, and the result says so)"))
    kv_cache: str | None = field(default=None, **_help(
        "a diffusion checkpoint's KV cache while it decodes for infill and steps_sweep: %(choices)s (as in "
        "generate)", choices=SamplerChoices("KV_CACHES"), metavar="CACHE"))
    tasks: Names | None = field(default=None, **_help(
        "lm-evaluation-harness tasks, comma-separated: run through lm-eval's Python API with the dlm-adapt backend "
        "(a causal LM: lm-eval's hf backend); needs the eval extra", metavar="T1,T2"))
    limit: float | None = field(default=None, **_help(
        "lm-eval: examples per task (a fraction of each task if below 1)"))
    include_path: str | None = field(default=None, **_help(
        "lm-eval: a directory of task YAMLs to add to lm-eval's own (e.g. tasks over local files)", metavar="DIR"))
    num_fewshot: int | None = field(default=None, **_help("lm-eval: few-shot examples (default: each task's)"))
    is_causal: bool = field(default=False, **_help(
        "lm-eval: score a diffusion checkpoint as its causal self (the exact AR likelihood; a sanity baseline)"))

    def __post_init__(self):
        if self.seq_length is None:
            self.seq_length = 128
        if self.num_sequences is None:
            self.num_sequences = 64
        self.metrics = Names(self.metrics)
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise AdaptError(f"unknown metric {', '.join(unknown) or '(none given)'}; choose from "
                             f"{', '.join(METRICS)}")
        self.metrics = Names(dict.fromkeys(self.metrics))
        if self.tasks is not None:
            self.tasks = Names(self.tasks)
        if self.data is None and not self.tasks:
            raise AdaptError("nothing to evaluate: give --data (held-out text) or --tasks (lm-eval tasks)")
        if (self.limit is not None or self.include_path is not None or self.num_fewshot is not None
                or self.is_causal) and not self.tasks:
            raise AdaptError("--limit, --include-path, --num-fewshot and --is-causal apply to lm-eval tasks: add "
                             "--tasks")
        if self.separator is not None and self.data is None:
            raise AdaptError("--separator packs --data's documents: add --data, or drop --separator")
        if self.separator == "":
            raise AdaptError("--separator is empty: name a token of the tokenizer, or drop it")
        if self.limit is not None and self.limit <= 0:
            raise AdaptError(f"limit must be positive, got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:  # lm-eval would take it and print a notice
            raise AdaptError(f"--num-fewshot must be 0 or more, got {self.num_fewshot}")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise AdaptError(f"--include-path {self.include_path} is not a directory of task YAMLs")
        if self.sweep_steps is not None:
            self.sweep_steps = Ints(self.sweep_steps)
        for name in ("mc_samples", "seq_length", "num_sequences", "batch_size", "infill_examples", "sweep_length",
                     "sweep_examples", "block_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise AdaptError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.sweep_steps is not None:
            bad = [s for s in self.sweep_steps if not 1 <= s <= self.sweep_length]
            if bad or not self.sweep_steps:
                raise AdaptError(f"sweep steps must be between 1 and --sweep-length ({self.sweep_length}), got "
                                 f"{', '.join(map(str, bad)) or '(none)'}")
        if self.seq_length < 2:
            raise AdaptError("seq_length must be at least 2 (the first token of a sequence is context)")
        if self.data is not None and self.block_size is not None and self.block_size > self.seq_length:
            # (lm-eval tasks alone score their own sequences, up to the model's positions)
            raise AdaptError(f"block_size ({self.block_size}) exceeds seq_length ({self.seq_length}): a block is "
                             "scored inside one packed sequence; use a block size of at most the sequence length")
        if self.plot is not None and "steps_sweep" not in self.metrics:
            raise AdaptError("--plot draws the steps sweep: add steps_sweep to --metrics")
        span = self.infill_span
        if span is not None and "infill" in self.metrics and not 1 <= span <= self.seq_length - 2:
            raise AdaptError(f"infill span must be between 1 and seq_length − 2 ({self.seq_length - 2}), got "
                             f"{self.infill_span}")
        if isinstance(self.ar_parent, (str, Path)) and not Path(self.ar_parent).expanduser().exists():
            raise AdaptError(f"--ar-parent {self.ar_parent} not found")
        from ..model.sampling_masked_diffusion import SamplingError, check_sampling_options

        try:
            check_sampling_options(kv_cache=self.kv_cache)
        except SamplingError as e:
            raise AdaptError(str(e)) from e


@dataclass
class PushOptions:
    """`dlm-adapt push DIR REPO_ID` = `adapt.push_to_hub(directory, repo_id, **options)`."""

    private: bool = field(default=False, **_help("create the repo private (an existing repo keeps its visibility)"))
    revision: str | None = field(default=None, **_help(
        "branch to commit to, created if missing (default: main)", metavar="BRANCH"))
    commit_message: str | None = field(default=None, **_help("commit message", metavar="M"))
    adapter_only: bool = field(default=False, **_help(
        "DIR must be a PEFT adapter: upload only adapter_config.json and adapter_model.safetensors (and the card)"))
    dry_run: bool = field(default=False, **_help("print the files and the card; contact nothing"))

    def __post_init__(self):
        if self.revision is not None:
            problem = _ref_problem(self.revision)
            if problem:
                raise AdaptError(f"--revision {self.revision!r} is not a valid branch name ({problem}); name a branch "
                                 "such as main or my-experiment")


def _ref_problem(name: str) -> str | None:
    """Why `name` cannot be a git branch (git check-ref-format's rules), else None: the Hub would refuse it only
    after the upload was prepared, and a dry run would print it as if it were fine."""
    bad = sorted({c for c in name if c in " ~^:?*[\\" or ord(c) < 32 or ord(c) == 127})
    if not name:
        return "it is empty"
    if bad:
        return f"it contains {' '.join(repr(c) for c in bad)}"
    if ".." in name or "@{" in name or "//" in name:
        return f"it contains {next(x for x in ('..', '@{', '//') if x in name)!r}"
    if name == "@" or name.startswith("/") or name.endswith(("/", ".", ".lock")):
        return "it is '@', or starts with '/', or ends with '/', '.' or '.lock'"
    if any(part.startswith(".") for part in name.split("/")):
        return "a part of it starts with '.'"
    return None


@dataclass
class UpgradeOptions:
    """`dlm-adapt upgrade DIR` = `adapt.upgrade(directory, **options)`."""

    check: bool = field(default=False, **_help(
        "only report whether an upgrade is needed (exit 1 if so); write nothing"))


@dataclass
class ServeOptions:
    """`dlm-adapt serve MODEL` = `adapt.serve(model, **options)`: an OpenAI-compatible server. Requests choose their
    decoding settings (max_tokens, temperature, ... and dlm-adapt's steps, threshold, remasking, ...)."""

    host: str = field(default="127.0.0.1", **_help(
        "address to bind (0.0.0.0: every interface; then also set --api-key)"))
    port: int = field(default=8000, **_help("TCP port"))
    model_name: str | None = field(default=None, **_help(
        "the model id clients send (default: the checkpoint directory's name)"))
    max_batch_size: int = field(default=8, **_help(
        "requests decoded together in one left-padded batch (those that arrive together with the same settings)"))
    max_queue: int = field(default=64, **_help("requests waiting beyond that; more are answered 429"))
    batch_wait_ms: float = field(default=5.0, **_help(
        "how long the model worker waits for more requests before it starts a batch (milliseconds)"))
    api_key: str | None = field(default=None, **_help(
        "require `Authorization: Bearer KEY` on /v1/ routes (default: the DLM_ADAPT_API_KEY environment variable, "
        "else none)", metavar="KEY"))
    chat_template: str | None = field(default=None, **_help(
        "a Jinja chat template file for a tokenizer without one (/v1/chat/completions needs one)", metavar="FILE"))
    shutdown_timeout: float = field(default=10.0, **_help(
        "on Ctrl-C / SIGTERM: seconds running requests may take to finish before they are cancelled"))
    log_level: Literal["critical", "error", "warning", "info", "debug"] = field(default="info", **_help(
        "uvicorn's log level (debug adds the access log: methods, paths and statuses, never texts)"))

    def __post_init__(self):
        for name in ("max_batch_size", "max_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AdaptError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not 0 <= self.port <= 65535:
            raise AdaptError(f"--port must be between 0 and 65535, got {self.port}")
        if self.batch_wait_ms < 0 or self.shutdown_timeout < 0:
            raise AdaptError("--batch-wait-ms and --shutdown-timeout must be 0 or more")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise AdaptError(f"--chat-template {self.chat_template} not found (a file holding a Jinja template)")
