"""Streaming safetensors rewrite: rename, retype or replace tensors one at a time.

`safetensors.save_file` needs every tensor of a shard in memory at once; conversion must hold at most one
copy of the weights, so unchanged tensors are copied byte-for-byte from the source file and only the tensors
that change (a resized embedding, a dtype cast) are materialised, one at a time. The format is an 8-byte
little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}, then the raw bytes.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from .errors import AdaptError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {v: k for k, v in _DTYPES.items()}
_COPY_CHUNK = 64 << 20


@dataclass
class StoredTensor:
    """A tensor inside a safetensors file, not loaded."""

    path: Path
    name: str
    dtype: str
    shape: list[int]
    begin: int  # absolute byte offsets in the file
    end: int

    def load(self) -> torch.Tensor:
        # a plain read, not mmap: mapped pages would count once more in the process's memory
        buf = bytearray(self.end - self.begin)
        with open(self.path, "rb") as f:
            f.seek(self.begin)
            if f.readinto(buf) != len(buf):
                raise AdaptError(f"{self.path} ended early while reading {self.name}: the file is truncated")
        return torch.frombuffer(buf, dtype=_DTYPES[self.dtype]).reshape(self.shape) if buf else \
            torch.empty(self.shape, dtype=_DTYPES[self.dtype])


def read_index(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file; a truncated or corrupt file is an AdaptError."""
    try:
        with safe_open(str(path), framework="pt"):
            pass  # validates the header against the file size
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (SafetensorError, OSError, ValueError, struct.error) as e:
        raise AdaptError(f"corrupt or truncated safetensors file {path}: {e}. Re-download or re-save the checkpoint") from e
    base = 8 + header_len
    return {
        name: StoredTensor(path, name, info["dtype"], info["shape"], base + info["data_offsets"][0],
                           base + info["data_offsets"][1])
        for name, info in header.items()
        if name != "__metadata__"
    }


# What to write for one output tensor: a stored tensor copied as bytes, or a function producing the tensor as
# consecutive pieces along dim 0 (so a grown embedding is written as old rows + new rows, never concatenated).
Entry = StoredTensor | Callable[[], list[torch.Tensor]]


def read_shards(directory: Path) -> dict[str, dict[str, StoredTensor]]:
    """{shard file: its tensors} of the safetensors weights in `directory`: the shards model.safetensors.index.json
    lists, or the single model.safetensors."""
    index = directory / "model.safetensors.index.json"
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise AdaptError(f"corrupt shard index {index}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    for shard in shards:
        if not (directory / shard).is_file():
            raise AdaptError(f"shard {shard} listed in {index} is missing" if index.is_file()
                             else f"{directory} has no model.safetensors")
    return {shard: read_index(directory / shard) for shard in shards}


def _write_tensor(out, t: torch.Tensor) -> int:
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    out.write(data)  # buffer protocol: no bytes copy
    return data.nbytes


def write_safetensors(path: Path, entries: dict[str, Entry], shapes: dict[str, tuple[str, list[int]]]) -> int:
    """Write `entries` (in order) to `path`; `shapes` gives each entry's (dtype code, shape) up front,
    because the header precedes the data. Returns the number of data bytes written."""
    header, offset = {}, 0
    for name in entries:
        code, shape = shapes[name]
        size = _element_size(code)
        for d in shape:
            size *= d
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for name, entry in entries.items():
            expected = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if isinstance(entry, StoredTensor):
                written = _copy_range(entry, out)
            else:
                pieces = entry()
                rows = sum(p.shape[0] for p in pieces) if pieces[0].dim() else 1
                declared = (header[name]["dtype"], header[name]["shape"])
                if (_CODES[pieces[0].dtype], [rows, *pieces[0].shape[1:]] if pieces[0].dim() else []) != declared:
                    raise RuntimeError(f"tensor {name} does not match its declared dtype/shape")
                written = sum(_write_tensor(out, p) for p in pieces)
            if written != expected:
                raise RuntimeError(f"wrote {written} bytes for {name}, expected {expected}")
    return offset


def _copy_range(t: StoredTensor, out) -> int:
    done = 0
    with open(t.path, "rb") as src:
        src.seek(t.begin)
        while done < t.end - t.begin:
            chunk = src.read(min(_COPY_CHUNK, t.end - t.begin - done))
            if not chunk:
                raise AdaptError(f"{t.path} ended early while copying {t.name}: the file is truncated")
            out.write(chunk)
            done += len(chunk)
    return done


def _element_size(code: str) -> int:
    return torch.empty((), dtype=_DTYPES[code]).element_size()


def dtype_code(dtype: torch.dtype) -> str:
    return _CODES[dtype]


def torch_dtype(code: str) -> torch.dtype:
    if code not in _DTYPES:
        raise AdaptError(f"unsupported safetensors dtype {code}")
    return _DTYPES[code]
