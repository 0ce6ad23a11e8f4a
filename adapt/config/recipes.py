"""Training configuration: dataclasses with documented fields, loaded from YAML with `dotted.key=value`
overrides. An unknown key or a value of the wrong type is an error that names the key (`parsing.from_dict`, the
checker lm-eval's model args go through too).

Why not HfArgumentParser, as the other commands: a recipe nests sections (`model:`, `train:`, `block:` ...) and
HfArgumentParser makes one flat flag per field: a section becomes a single flag, and `parse_dict` /
`parse_yaml_file` hand its mapping through unbuilt and unchecked (`TrainConfig.train` stays a dict), with no
`train.lr=...` override. This is the one nested
loader; the dataclasses, the checker and the way text becomes a value (YAML) are shared."""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml

from ..errors import AdaptError
from ..ranges import FieldError, check_ranges
from .commands import DTYPE_NAMES, SourceOptions
from .diffusion import AnnealConfig, BlockConfig, ObjectiveConfig
from .drafter import DrafterConfig, GenerateDataConfig, check_drafter_sections
from .parsing import from_dict, parse_value


DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass
class ModelConfig(SourceOptions):
    """The model a run trains. `mask_token`, `shift` and `gguf_file` (`SourceOptions`, as `dlm-adapt convert`'s
    flags) are used only when `path` is a causal source."""

    path: str = ""
    """A dlm-adapt checkpoint, or a causal source (directory, .gguf, Hub id) converted into OUTPUT/converted."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the weights are loaded in (mixed precision is `train.mixed_precision`)."""
    attn_implementation: str = "sdpa"
    """transformers' attention switch: `sdpa`, `eager`, `flash_attention_2` (needs flash-attn and a GPU it supports,
    checked before anything loads), ..."""
    gradient_checkpointing: bool = False

    def __post_init__(self):
        from ..attention import check_attn_implementation

        check_attn_implementation(self.attn_implementation, "model.attn_implementation")


@dataclass
class DataConfig:
    train: str = ""
    """Local .txt/.jsonl/.json/.parquet file (or comma-separated files), or a Hub dataset name."""
    validation: str | None = None
    """Same forms as `train`. If unset, `validation_fraction` of the training documents is held out before
    packing, so no validation text is ever trained on."""
    validation_fraction: float = 0.05
    hub_split: str = "train"
    hub_config: str | None = None
    text_column: str = "text"
    sample_by: Literal["line", "paragraph", "document"] = "paragraph"
    """How a .txt file splits into documents (blank-line-separated paragraphs by default)."""
    seq_length: int = 256
    """Tokens per packed training sequence (documents joined, each with the BOS its tokenizer puts first, or with EOS
    after it where the tokenizer adds none). Called `block_length` before 0.6.0, a name now kept for the decoding
    block."""
    separator: str | None = None
    """Null: documents are packed as the tokenizer marks a text (above). Or a special token put after each
    document instead, for a parent pretrained with a separator its tokenizer does not add (measure what the parent
    pays for it first: SmolLM2-135M-Instruct pays 12.5 nats per `<|endoftext|>` against 5.2 per its EOS). The
    checkpoint records it, and `dlm-adapt eval` packs with it."""
    max_eval_sequences: int = 64
    generate: GenerateDataConfig = field(default_factory=GenerateDataConfig)
    """Drafter runs: train on the parent's own continuations of training-text prompts (`adapt.config.drafter`)."""

    def __post_init__(self):
        check_ranges(self, {"validation_fraction": "[0, 1)", "seq_length": "[2, inf)",
                            "max_eval_sequences": "[1, inf)"})
        if self.separator == "":
            raise FieldError("separator", "is empty: name a token of the tokenizer, or null for its own marks")


@dataclass
class SFTDataConfig:
    """SFT data (REFERENCE §6): only assistant tokens are maskable and carry loss; one sample per row (never
    packed, so no attention crosses samples), answers padded with EOS to a fixed canvas."""

    train: str = ""
    """Local .jsonl/.json/.parquet file (or comma-separated files), or a Hub dataset name."""
    validation: str | None = None
    """Same forms as `train`. If unset, `validation_fraction` of the training samples is held out."""
    validation_fraction: float = 0.05
    hub_split: str = "train"
    hub_config: str | None = None
    format: Literal["auto", "messages", "prompt_completion", "instruction"] = "auto"
    """`messages`: a column of conversations, lists of {role, content}, multi-turn allowed. `prompt_completion`:
    `prompt` and `completion` columns (strings, or message lists). `instruction`: `instruction`, optional
    `input`, and `output` columns (Alpaca). `auto` picks by the columns present, in that order."""
    messages_column: str = "messages"
    chat_template: str | None = None
    """Null: the tokenizer's own chat template (an error if it has none). `default`: dlm-adapt's plain template
    (`### User:` / `### Assistant:` turns, each answer ending with EOS). Or a Jinja template string. The template used
    is saved with OUTPUT/final's tokenizer, so `dlm-adapt generate --chat` uses it too."""
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    """Which assistant turns are noised and trained; the others are prompt (never masked)."""
    max_length: int = 256
    """The canvas: tokens per sample, prompt + answer + EOS padding."""
    eos_padding: Literal["trained", "clean", "none"] = "trained"
    """`trained` (LLaDA): answers are padded with EOS to `max_length`; the padding is maskable and carries loss,
    which teaches the model to end. `clean`: the EOS padding is never masked and carries no loss (the model then
    sees the answer length during training, which it will not at generation). `none`: rows are padded with
    attention-masked padding instead; the model never learns to fill a canvas with EOS."""
    truncation: Literal["error", "drop"] = "error"
    """Samples longer than `max_length`: `error` stops with their count; `drop` skips them and reports the count.
    Nothing is ever cut."""
    max_eval_samples: int = 64

    def __post_init__(self):
        check_ranges(self, {"validation_fraction": "[0, 1)", "max_length": "[2, inf)",
                            "max_eval_samples": "[1, inf)"})
        if self.chat_template and self.chat_template != "default":
            _check_jinja("chat_template", self.chat_template)


def _check_jinja(key: str, template: str):
    # before any model or data is loaded: transformers compiles the template only when it first renders a sample
    import jinja2

    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise FieldError(key, f"is not a valid Jinja template (line {e.lineno}: {e.message}); fix it, or use "
                              "'default' or null (the tokenizer's own)") from None


@dataclass
class LoraOptions:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    """PEFT target modules; `all-linear` is every linear layer except the LM head."""
    train_mask_token: bool = True
    """Make the [MASK] embedding row trainable (PEFT trainable tokens): the new token has to be learned."""
    save_adapter_only: bool = False
    """Write only the adapter to OUTPUT/final instead of merging it into the model."""

    def __post_init__(self):
        check_ranges(self, {"r": "[1, inf)", "alpha": "(0, inf)", "dropout": "[0, 1)"})


@dataclass
class TrainOptions:
    method: Literal["full", "lora", "qlora"] = "full"
    batch_size: int = 8
    """Packed sequences per device per micro-step."""
    gradient_accumulation_steps: int = 1
    lr: float = 1e-4
    attention_lr: float | None = None
    """Separate learning rate for attention parameters (RND1 trains attention faster than MLPs)."""
    mlp_lr: float | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "cosine"
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0

    def __post_init__(self):
        check_ranges(self, {"batch_size": "[1, inf)", "gradient_accumulation_steps": "[1, inf)", "lr": "(0, inf)",
                            "attention_lr": "(0, inf)", "mlp_lr": "(0, inf)", "weight_decay": "[0, inf)",
                            "betas": "[0, 1)", "warmup_steps": "[0, inf)", "max_grad_norm": "[0, inf)",
                            "seed": "[0, inf)"})


@dataclass
class TrainConfig:
    output_dir: str = "runs/adapt"
    max_steps: int = 100
    """Optimizer steps."""
    save_steps: int = 100
    eval_steps: int = 50
    log_steps: int = 1
    sample_steps: int = 0
    """Every this many steps, decode a few samples into OUTPUT/samples.log (0: never)."""
    save_total_limit: int = 2
    stop_after: int | None = None
    """Stop after this many steps in this invocation, saving a checkpoint (time-limited or preemptible jobs);
    run again with resume=true to continue. The schedule still spans `max_steps`."""
    resume: bool | str = False
    """`true`: continue from the newest checkpoint in OUTPUT/checkpoints; or a checkpoint directory."""
    overwrite: bool = False
    """Delete an existing run of the same kind in `output_dir` and start over (a rerun otherwise resumes, with
    `resume`, or is refused). A directory dlm-adapt did not write is never deleted."""
    tensorboard: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    anneal: AnnealConfig = field(default_factory=AnnealConfig)
    block: BlockConfig = field(default_factory=BlockConfig)
    """Block diffusion: block size, and the schedule from AR to blocks. Off (full-sequence) unless the checkpoint
    or `block.size` has a block size."""
    train: TrainOptions = field(default_factory=TrainOptions)
    lora: LoraOptions = field(default_factory=LoraOptions)
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    """Drafter training: distil the frozen parent into a drafter checkpoint's adapter (`adapt.config.drafter`)."""

    def __post_init__(self):
        check_drafter_sections(self.drafter, self.data, self.train.method)
        if self.block.size is not None and self.anneal.mode != "none":
            raise FieldError("anneal.mode", "must be none with block diffusion (block.size is set): the block "
                                            "schedule replaces annealing, starting from the AR model at block size 1")
        # 0 turns saving, evaluation and sampling off
        check_ranges(self, {"max_steps": "[1, inf)", "save_steps": "[0, inf)", "eval_steps": "[0, inf)",
                            "log_steps": "[1, inf)", "sample_steps": "[0, inf)", "save_total_limit": "[0, inf)",
                            "stop_after": "[1, inf)"})
        # a block longer than a training row is never whole: the schedule would train, and OUTPUT/final decode,
        # a block size no row has (the row length is checked against the model's positions with the data)
        row_key, row = (("data.seq_length", self.data.seq_length) if hasattr(self.data, "seq_length")
                        else ("data.max_length", self.data.max_length))
        for key, size in (("size", self.block.size), ("decay_to", self.block.decay_to),
                          *(("schedule", s) for s in self.block.schedule)):
            if size is not None and size > row:
                raise FieldError(f"block.{key}", f"({size}) exceeds {row_key} ({row}), the tokens of a training "
                                                 f"row: use a block size of at most {row}, or raise {row_key}")


@dataclass
class SFTConfig(TrainConfig):
    """`dlm-adapt sft`: the training config with SFT data. Defaults differ from adaptation: no annealing (the
    model is normally an adapted checkpoint) and per-answer-length loss normalisation (LLaDA SFT)."""

    output_dir: str = "runs/sft"
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(normalization="sequence"))
    anneal: AnnealConfig = field(default_factory=lambda: AnnealConfig(mode="none"))


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls=TrainConfig):
    """A config from a YAML file (optional) and `dotted.key=value` overrides (values parsed as YAML)."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise AdaptError(f"config file {path} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:  # PyYAML's message runs to several lines (context, the line itself, a caret)
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise AdaptError(f"config file {path} is not valid YAML{where}: {problem}") from None
        if not isinstance(data, dict):
            raise AdaptError(f"config file {path} must hold a mapping of keys")
        # a run's OUTPUT/config.json is a recipe too; its `kind` must be the command's
        kind = data.pop("kind", cls.__name__)
        if kind != cls.__name__:
            raise AdaptError(f"config file {path} records a {kind} run, not a {cls.__name__} one (`dlm-adapt train` "
                             "takes TrainConfig, `dlm-adapt sft` SFTConfig)")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AdaptError(f"override {item!r} is not of the form dotted.key=value")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise AdaptError(f"override {item!r}: {p} is not a section")
        try:
            node[leaf] = parse_value(value)
        except yaml.YAMLError as e:
            problem = str(e).splitlines()[0]
            raise AdaptError(f"override {item!r}: the value is not valid YAML ({problem}); fix it, or quote a "
                             "literal string") from e
    return from_dict(cls, data)


# what `kind` in a run's OUTPUT/config.json names
RUN_KINDS = {cls.__name__: cls for cls in (TrainConfig, SFTConfig)}


def to_dict(cfg) -> dict:
    """The config as a run records it (OUTPUT/config.json): `kind`, its class, tells an SFT run from an adaptation
    run to readers such as the model card; every field follows. Reads back with `run_config`, or as a recipe."""
    return {"kind": type(cfg).__name__, **dataclasses.asdict(cfg)}


def run_config(data: dict):
    """A run's recorded config (`to_dict`) as its dataclass. Runs recorded before `kind` existed are told apart by
    the field only SFT data has (`data.max_length`)."""
    data = dict(data)  # the caller's mapping keeps its `kind`
    kind = data.pop("kind", None)
    if kind is None:
        kind = SFTConfig.__name__ if "max_length" in (data.get("data") or {}) else TrainConfig.__name__
    if kind not in RUN_KINDS:
        raise AdaptError(f"unknown run kind {kind!r} (known: {', '.join(RUN_KINDS)})")
    return from_dict(RUN_KINDS[kind], data)
