"""`Batch`: rows of token ids with the masks that say which tokens may be noised and which are real.

Packed pretraining sequences carry no masks (every token is maskable and real), so they cost no more memory than
their ids; SFT rows carry both (the prompt is never noised, padding is never attended to). Training, the
training-time ELBO and the sample log all read a `Batch`, never a bare tensor whose shape says what it holds.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    """(rows, L) token ids."""
    maskable: torch.Tensor | None = None
    """(rows, L) bool: which tokens may be noised and carry loss. None: all of them."""
    attention_mask: torch.Tensor | None = None
    """(rows, L) 1 on real tokens, 0 on padding. None: no padding."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, rows) -> "Batch":
        """The rows selected by an int tensor, a slice or a boolean mask (always a Batch, never one row)."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1 or None)
        return Batch(self.input_ids[rows], _take(self.maskable, rows), _take(self.attention_mask, rows))

    @property
    def padding(self) -> torch.Tensor:
        """The attention mask, materialised (all ones when the rows carry none)."""
        return self.attention_mask if self.attention_mask is not None else torch.ones_like(self.input_ids)

    @property
    def shape(self) -> torch.Size:
        return self.input_ids.shape

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), _move(self.maskable, device), _move(self.attention_mask, device))

    @classmethod
    def cat(cls, batches: list["Batch"]) -> "Batch":
        """Rows of several batches of the same length; masks are filled in where only some batches carry them."""
        def joined(name, fill):
            parts = [getattr(b, name) for b in batches]
            if all(p is None for p in parts):
                return None
            return torch.cat([fill(b) if p is None else p for b, p in zip(batches, parts)])

        return cls(torch.cat([b.input_ids for b in batches]),
                   joined("maskable", lambda b: torch.ones_like(b.input_ids, dtype=torch.bool)),
                   joined("attention_mask", lambda b: torch.ones_like(b.input_ids)))

    def split(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0, maskable, padding) as a training step uses them, masks materialised; trailing columns that are
        padding in every row are dropped (attention to them is masked anyway, so they would be pure cost)."""
        x0 = self.input_ids
        maskable = self.maskable if self.maskable is not None else torch.ones_like(x0, dtype=torch.bool)
        if self.attention_mask is None:
            return x0, maskable, self.padding
        keep = int(self.attention_mask.sum(1).max())
        return x0[:, :keep], maskable[:, :keep], self.attention_mask[:, :keep]


def as_batch(rows) -> Batch:
    """A `Batch` from a Batch or a plain (rows, L) tensor of token ids."""
    if isinstance(rows, Batch):
        return rows
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
        raise TypeError("expected a (rows, L) tensor of token ids or an adapt.batch.Batch, got "
                        + (f"a tensor of shape {tuple(rows.shape)}" if isinstance(rows, torch.Tensor)
                           else type(rows).__name__))
    return Batch(rows)


def _take(mask, rows):
    return None if mask is None else mask[rows]


def _move(mask, device):
    return None if mask is None else mask.to(device)
