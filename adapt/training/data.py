"""Pretraining-style data: documents from local files or the Hub through `datasets`, tokenised and packed into
fixed-length sequences, each document marked as the parent's pretraining marked it (`document_separator`); a
validation split held out at document level."""

import contextlib
import json
from pathlib import Path

import torch

from .batch import Batch
from ..config import DataConfig
from ..errors import AdaptError

_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_EXPECTED = {".txt": "UTF-8 text", ".json": "a JSON array of objects, or one JSON object per line",
             ".jsonl": "one JSON object per line", ".parquet": "a Parquet table"}


SMALL_FILES = 64 << 20  # local data up to this size is read in full before loading: its problem is named first


def _local_files(spec: str) -> list[Path] | None:
    """The local files `spec` names, or None for a Hub dataset name."""
    files = [s.strip() for s in spec.split(",") if s.strip()]
    local = [Path(f).expanduser() for f in files]
    if any(p.exists() or p.suffix in _BUILDERS or f.startswith(("/", ".", "~")) for p, f in zip(local, files)):
        return local
    return None


def check_data_files(spec: str | None):
    """Refuse missing, empty or unreadable local data files before anything is loaded; a large file is read only
    if `datasets` fails on it."""
    local = _local_files(spec) if spec else None
    for p in local or []:
        if not p.is_file():
            raise AdaptError(f"data file {p} not found")
        if p.suffix not in _BUILDERS:
            raise AdaptError(f"data file {p}: unsupported type (use {', '.join(_BUILDERS)})")
        if p.stat().st_size == 0:
            raise AdaptError(f"data file {p} is empty; expected {_EXPECTED[p.suffix]}")
    if local and sum(p.stat().st_size for p in local) <= SMALL_FILES:
        _raise_file_problem(local)


def _raise_file_problem(local: list[Path], cause: Exception | None = None):
    for p in local:
        problem = _file_problem(p)
        if problem:
            raise AdaptError(f"data file {p} {problem}; expected {_EXPECTED[p.suffix]}") from cause


def load_table(spec: str, cfg) -> "datasets.Dataset":
    """Rows from local files (comma-separated .txt/.json/.jsonl/.parquet) or a Hub dataset name. `cfg` needs
    `hub_split`, `hub_config` and, for .txt files, `sample_by`."""
    import datasets

    local = _local_files(spec)
    try:
        if local is not None:
            check_data_files(spec)
            builder = _BUILDERS[local[0].suffix]
            extra = {"sample_by": getattr(cfg, "sample_by", "line")} if builder == "text" else {}
            small = sum(p.stat().st_size for p in local) <= SMALL_FILES
            with _datasets_quiet(progress=not small):  # a small file loads in a blink: no progress bar
                return datasets.load_dataset(builder, data_files=[str(p) for p in local], split="train", **extra)
        return datasets.load_dataset(spec, cfg.hub_config, split=cfg.hub_split)
    except AdaptError:
        raise
    except Exception as e:  # datasets raises many types for unreadable files and unreachable Hub names
        # datasets wraps the cause in "An error occurred while generating the dataset": find it in the files
        _raise_file_problem([p for p in local or [] if p.is_file()], e)
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        raise AdaptError(f"cannot load dataset {spec}: {type(cause).__name__}: {_first_line(cause)}") from e


@contextlib.contextmanager
def _datasets_quiet(progress: bool):
    # datasets logs a failed file at ERROR level before raising; the AdaptError is the one line to show
    import datasets
    from datasets.utils import logging

    level, bars = logging.get_verbosity(), not datasets.are_progress_bars_disabled()
    logging.set_verbosity(logging.CRITICAL)
    if bars and not progress:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _file_problem(path: Path) -> str | None:
    """Where and why a local data file is unreadable, found after `datasets` failed on it (datasets says only
    that generating the dataset failed)."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            pq.read_metadata(path)
        except Exception as e:
            return f"is not a Parquet file ({_first_line(e)})"
        return None
    with open(path, "rb") as f:
        head = f.read(1 << 16).lstrip()
        if path.suffix == ".json" and head.startswith(b"["):  # one JSON document, not JSON lines
            f.seek(0)
            try:
                data = json.loads(f.read())
            except UnicodeDecodeError:
                return "is not UTF-8 text"
            except ValueError as e:
                return f"is not valid JSON at line {e.lineno} ({e.msg})"
            return None if all(isinstance(r, dict) for r in data) else "is a JSON array holding non-objects"
        f.seek(0)
        records = 0
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                return f"line {number} is not UTF-8 text"
            if path.suffix == ".txt" or not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                return f"line {number} is not valid JSON ({e.msg.removesuffix(' at')}, column {e.colno})"
            if not isinstance(record, dict):
                return f"line {number} is a JSON {type(record).__name__}, not an object"
            records += 1
    return "holds only blank lines" if path.suffix != ".txt" and not records else None


def load_documents(spec: str, cfg: DataConfig) -> list[str]:
    ds = load_table(spec, cfg)
    if cfg.text_column not in ds.column_names:
        raise AdaptError(f"dataset {spec} has no column '{cfg.text_column}' (columns: {', '.join(ds.column_names)}); "
                         "set data.text_column")
    return [t for t in ds[cfg.text_column] if t and t.strip()]


def document_separator(tokenizer, token: str | None = None) -> tuple[str, int]:
    """How packed documents are told apart: ("bos", id) where the tokenizer puts BOS before a text by default
    (LLaMA's, Gemma's, Mistral's: their models were pretrained on documents that start with it, and generation
    prompts start with it too), else ("eos", id): EOS after each document (GPT-2's, Qwen's, SmolLM2's convention).
    Either way the token also stands between two documents, so they never run together. `token` (`data.separator`,
    eval's `--separator`) names the token put after each document instead, for a parent pretrained with a
    separator its tokenizer does not add."""
    if token is not None:
        vocab = tokenizer.get_vocab()  # convert_tokens_to_ids would answer an unknown token with the UNK id
        where = "in data.separator (eval: --separator)"
        if token not in vocab:
            raise AdaptError(f"separator {token!r} is not a token of the tokenizer's vocabulary: name one it has "
                             f"(its EOS is {tokenizer.eos_token!r}) {where}, or unset it for the tokenizer's own "
                             "marks")
        special = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()
                                                       if t.special}
        if token not in special:  # an ordinary token also occurs inside documents: each would end one there
            raise AdaptError(f"separator {token!r} is an ordinary token of the text, so every occurrence would end a "
                             f"document: name a special token {where} (e.g. {tokenizer.eos_token!r})")
        if vocab[token] == getattr(tokenizer, "mask_token_id", None):
            raise AdaptError(f"separator {token!r} is the [MASK] token, which marks noised positions: name the token "
                             f"the parent saw between documents {where}")
        return "eos", vocab[token]
    bos = tokenizer.bos_token_id
    added = tokenizer("a")["input_ids"][:1], tokenizer("a", add_special_tokens=False)["input_ids"][:1]
    if bos is not None and added[0] == [bos] and added[1] != [bos]:
        return "bos", bos
    if tokenizer.eos_token_id is None:
        raise AdaptError("the tokenizer adds no BOS and has no EOS token to separate packed documents: set its "
                         "eos_token (tokenizer_config.json), or name a separator token (data.separator)")
    return "eos", tokenizer.eos_token_id


def pack(documents: list[str], tokenizer, seq_length: int, what: str, max_rows: int | None = None,
         separator: str | None = None) -> torch.Tensor:
    """(N, seq_length) LongTensor: documents tokenised (BOS first, or EOS or `separator` last:
    `document_separator`), joined and cut into full sequences; with `max_rows`, the first max_rows of them
    (tokenising no more documents than they need)."""
    kind, mark = document_separator(tokenizer, separator)
    stream = []
    chunk = 1000 if max_rows is None else 64
    for start in range(0, len(documents), chunk):
        if max_rows is not None and len(stream) >= max_rows * seq_length:
            break
        # BOS: the tokenizer's own special tokens, exactly what a prompt of this text gets at generation
        for ids in tokenizer(documents[start:start + chunk], add_special_tokens=kind == "bos")["input_ids"]:
            stream.extend(ids)
            if kind == "eos":
                stream.append(mark)
    n = len(stream) // seq_length
    if max_rows is not None:
        n = min(n, max_rows)
    if n == 0:
        raise AdaptError(f"{what} data yields no full sequence of {seq_length} tokens ({len(stream)} tokens in "
                         f"{len(documents)} documents); add data or lower data.seq_length")
    return torch.tensor(stream[: n * seq_length], dtype=torch.long).view(n, seq_length)


def hold_out(items: list, fraction: float, seed: int, spec: str, unit: str) -> tuple[list, list]:
    """(kept, held_out): `fraction` of `items` (at least one) held out for validation, in the permutation of
    `seed`; the kept items stay in their original order. Pretraining documents and SFT samples share it."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(len(items) * fraction))
    if n_val >= len(items):
        raise AdaptError(f"dataset {spec} has too few {unit} ({len(items)}) to hold out validation")
    return [items[i] for i in sorted(order[n_val:])], [items[i] for i in order[:n_val]]


def build_datasets(cfg: DataConfig, tokenizer, max_positions: int | None, seed: int) -> tuple[Batch, Batch]:
    """(train, validation) packed sequences of `cfg.seq_length` tokens."""
    if not cfg.train:
        raise AdaptError("data.train is not set")
    if max_positions is not None and cfg.seq_length > max_positions:
        raise AdaptError(f"data.seq_length {cfg.seq_length} exceeds the model's {max_positions} positions")
    check_data_files(cfg.validation)  # before the training data loads: a bad file is the first thing said
    document_separator(tokenizer, cfg.separator)  # and a bad separator
    docs = load_documents(cfg.train, cfg)
    if not docs:
        raise AdaptError(f"dataset {cfg.train} is empty")
    if cfg.validation:
        val_docs = load_documents(cfg.validation, cfg)
    else:
        docs, val_docs = hold_out(docs, cfg.validation_fraction, seed, cfg.train, "documents")
    return (Batch(pack(docs, tokenizer, cfg.seq_length, "training", separator=cfg.separator)),
            Batch(pack(val_docs, tokenizer, cfg.seq_length, "validation", separator=cfg.separator)))


class SequenceLoader:
    """Deterministic order over packed sequences: epoch e uses permutation seed+e, and the position (epoch, index)
    is all a checkpoint needs to continue exactly. Every process draws the same global batch and keeps its
    slice, so data order does not depend on the number of processes."""

    def __init__(self, sequences: Batch, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        if global_batch > len(sequences):
            raise AdaptError(f"the global batch ({global_batch} sequences) is larger than the training set "
                             f"({len(sequences)} sequences); lower train.batch_size or add data")
        self.sequences, self.global_batch, self.seed = sequences, global_batch, seed
        self.rank, self.world = rank, world
        self.epoch, self.index = 0, 0
        self._order = None

    def _permutation(self):
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(len(self.sequences), generator=g)
        return self._order

    def next(self) -> Batch:
        """This process's slice of the next global batch."""
        if self.index + self.global_batch > len(self.sequences):  # drop the ragged end, start the next epoch
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        ids = self._permutation()[self.index:self.index + self.global_batch]
        self.index += self.global_batch
        per = self.global_batch // self.world
        return self.sequences[ids[self.rank * per:(self.rank + 1) * per]]

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict):
        self.epoch, self.index, self._order = state["epoch"], state["index"], None
