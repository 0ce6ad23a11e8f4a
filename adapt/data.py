"""Pretraining-style data: documents from local files or the Hub through `datasets`, tokenised and packed into
fixed-length blocks with EOS between documents; a validation split held out at document level."""

from pathlib import Path

import torch

from .config import DataConfig
from .errors import AdaptError

_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_table(spec: str, cfg) -> "datasets.Dataset":
    """Rows from local files (comma-separated .txt/.json/.jsonl/.parquet) or a Hub dataset name. `cfg` needs
    `hub_split`, `hub_config` and, for .txt files, `sample_by`."""
    import datasets

    files = [s.strip() for s in spec.split(",") if s.strip()]
    local = [Path(f).expanduser() for f in files]
    try:
        if any(p.exists() or p.suffix in _BUILDERS or f.startswith(("/", ".", "~")) for p, f in zip(local, files)):
            for p in local:
                if not p.is_file():
                    raise AdaptError(f"data file {p} not found")
                if p.suffix not in _BUILDERS:
                    raise AdaptError(f"data file {p}: unsupported type (use {', '.join(_BUILDERS)})")
            builder = _BUILDERS[local[0].suffix]
            extra = {"sample_by": getattr(cfg, "sample_by", "line")} if builder == "text" else {}
            return datasets.load_dataset(builder, data_files=[str(p) for p in local], split="train", **extra)
        return datasets.load_dataset(spec, cfg.hub_config, split=cfg.hub_split)
    except AdaptError:
        raise
    except Exception as e:  # datasets raises many types for unreadable files and unreachable Hub names
        raise AdaptError(f"cannot load dataset {spec}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def load_documents(spec: str, cfg: DataConfig) -> list[str]:
    ds = load_table(spec, cfg)
    if cfg.text_column not in ds.column_names:
        raise AdaptError(f"dataset {spec} has no column '{cfg.text_column}' (columns: {', '.join(ds.column_names)}); "
                         "set data.text_column")
    return [t for t in ds[cfg.text_column] if t and t.strip()]


def pack(documents: list[str], tokenizer, block_length: int, what: str, max_blocks: int | None = None) -> torch.Tensor:
    """(N, block_length) LongTensor: documents tokenised, joined with EOS, cut into full blocks; with
    `max_blocks`, the first max_blocks blocks (tokenising no more documents than they need)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise AdaptError("the tokenizer has no EOS token to separate packed documents")
    stream = []
    chunk = 1000 if max_blocks is None else 64
    for start in range(0, len(documents), chunk):
        if max_blocks is not None and len(stream) >= max_blocks * block_length:
            break
        for ids in tokenizer(documents[start:start + chunk], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
    n = len(stream) // block_length
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise AdaptError(f"{what} data yields no full block of {block_length} tokens ({len(stream)} tokens in "
                         f"{len(documents)} documents); add data or lower data.block_length")
    return torch.tensor(stream[: n * block_length], dtype=torch.long).view(n, block_length)


def build_datasets(cfg: DataConfig, tokenizer, max_positions: int | None, seed: int):
    """(train_blocks, validation_blocks)."""
    if not cfg.train:
        raise AdaptError("data.train is not set")
    if max_positions is not None and cfg.block_length > max_positions:
        raise AdaptError(f"data.block_length {cfg.block_length} exceeds the model's {max_positions} positions")
    docs = load_documents(cfg.train, cfg)
    if not docs:
        raise AdaptError(f"dataset {cfg.train} is empty")
    if cfg.validation:
        val_docs = load_documents(cfg.validation, cfg)
    else:
        order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = max(1, int(len(docs) * cfg.validation_fraction))
        if n_val >= len(docs):
            raise AdaptError(f"dataset {cfg.train} has too few documents ({len(docs)}) to hold out validation")
        val_docs = [docs[i] for i in order[:n_val]]
        docs = [docs[i] for i in sorted(order[n_val:])]
    return pack(docs, tokenizer, cfg.block_length, "training"), pack(val_docs, tokenizer, cfg.block_length, "validation")


class BlockLoader:
    """Deterministic order over packed blocks: epoch e uses permutation seed+e, and the position (epoch, index)
    is all a checkpoint needs to continue exactly. Every process draws the same global batch and keeps its
    slice, so data order does not depend on the number of processes."""

    def __init__(self, blocks: torch.Tensor, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        if global_batch > len(blocks):
            raise AdaptError(f"the global batch ({global_batch} blocks) is larger than the training set "
                             f"({len(blocks)} blocks); lower train.batch_size or add data")
        self.blocks, self.global_batch, self.seed = blocks, global_batch, seed
        self.rank, self.world = rank, world
        self.epoch, self.index = 0, 0
        self._order = None

    def _permutation(self):
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(len(self.blocks), generator=g)
        return self._order

    def next(self) -> torch.Tensor:
        """This process's slice of the next global batch."""
        if self.index + self.global_batch > len(self.blocks):  # drop the ragged end, start the next epoch
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        ids = self._permutation()[self.index:self.index + self.global_batch]
        self.index += self.global_batch
        per = self.global_batch // self.world
        return self.blocks[ids[self.rank * per:(self.rank + 1) * per]]

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict):
        self.epoch, self.index, self._order = state["epoch"], state["index"], None


def split_batch(batch: torch.Tensor):
    """(x0, maskable, padding) of a batch: packed blocks (rows, L) are all maskable and real; SFT rows
    (rows, 3, L) carry their own masks, and trailing columns that are padding in every row are dropped."""
    if batch.dim() == 2:
        return batch, torch.ones_like(batch, dtype=torch.bool), torch.ones_like(batch)
    x0, maskable, padding = batch.unbind(1)
    keep = int(padding.sum(1).max())
    return x0[:, :keep], maskable[:, :keep].bool(), padding[:, :keep]
