"""Safetensors shards written one tensor at a time, and their headers read without loading data.

A safetensors file is an 8-byte little-endian header length, a JSON header (`{name: {dtype, shape,
data_offsets: [begin, end)}, "__metadata__": {str: str}}`, padded with spaces to 8 bytes), then the raw
little-endian bytes of the tensors back to back. `ShardWriter` plans the whole header from shapes and dtypes,
writes it, then accepts tensors in any order and writes each at its offset, so the process never holds more
than the tensor being written. `ShardReader` is the other direction: one tensor's bytes read with a plain
positioned read into memory the process owns (no memory map), so the read happens on the thread that asks.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from lowvram.errors import CheckpointError

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
MAX_HEADER = 100 * 1024 * 1024


def nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def read_header_at(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file (tensor entries and `__metadata__`), checked against the
    file's size, and the byte offset where its tensor data starts."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated (no safetensors header); re-download or re-create it")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise CheckpointError(f"{path} is truncated or not a safetensors file; re-download or re-create it")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e}); check the file") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} has a corrupt safetensors header; re-download or re-create it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header; re-download or re-create it")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: {size} bytes, its header needs {8 + n + end}; "
                              "re-download or re-create it")
    return header, 8 + n


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size (see read_header_at)."""
    return read_header_at(path)[0]


def tensor_bytes(paths) -> dict[str, int]:
    """Tensor name -> stored bytes over safetensors files, from their headers alone."""
    out: dict[str, int] = {}
    for path in paths:
        for name, entry in read_header(path).items():
            if name != "__metadata__":
                a, b = entry["data_offsets"]
                out[name] = b - a
    return out


class ShardWriter:
    """One output shard. `entries`: name -> (shape, dtype); call `write(name, tensor)` once per entry.

    Entries are laid out by decreasing item size, then name, so every tensor is aligned to its own item
    size (the header is padded to 8 bytes). The layout depends only on the entries: reproducible bytes.
    """

    def __init__(self, path: Path, entries: dict[str, tuple[tuple, torch.dtype]], metadata: dict[str, str]):
        self.path = Path(path)
        raw, self._slots, data_bytes = _layout(entries, metadata)
        self._data_start = 8 + len(raw)
        self.size = self._data_start + data_bytes
        self._pending = set(self._slots)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
            os.ftruncate(self._fd, self.size)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, t: torch.Tensor) -> None:
        off, end, shape, dtype = self._slots[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{name}: planned {list(shape)} {dtype}, got {list(t.shape)} {t.dtype}")
        if name not in self._pending:
            raise ValueError(f"{name} written twice")
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        _write_all(self._fd, memoryview(data), self._data_start + off)
        self._pending.discard(name)

    def close(self) -> None:
        self.abort()
        if self._pending:
            raise RuntimeError(f"{self.path}: {len(self._pending)} planned tensors never written, "
                               f"e.g. {sorted(self._pending)[0]}")

    def abort(self) -> None:
        """Close the file (again: a no-op), written or not; the caller removes it."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class ShardReader:
    """The tensors of one safetensors file, each read with positioned reads into host memory.

    Unlike safetensors' `get_tensor` (a view of a memory map, whose pages are read when first touched, by
    whichever thread touches them), `read(key)` has read every byte when it returns, into a new tensor or
    a buffer the caller reuses: no file pages stay mapped. One thread at a time per reader.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.header, self._data_start = read_header_at(self.path)
        try:
            self._file = open(self.path, "rb", buffering=0)
        except OSError as e:
            raise CheckpointError(f"{self.path} cannot be read ({e.strerror or e}); check the file") from None

    def nbytes(self, key: str) -> int:
        begin, end = self.header[key]["data_offsets"]
        return end - begin

    def read(self, key: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `key` as stored (dtype, shape, bytes); CheckpointError if the file is short or unreadable.
        into: a uint8 host buffer of at least nbytes(key) to read into (the result is a view of it)."""
        entry = self.header[key]
        begin, end = entry["data_offsets"]
        dtype, shape = NAME_DTYPES[entry["dtype"]], tuple(entry["shape"])
        if end - begin != nbytes(shape, dtype):
            raise CheckpointError(f"{self.path}: {key} holds {end - begin} bytes, its shape {list(shape)} "
                                  f"{entry['dtype']} needs {nbytes(shape, dtype)}; re-download the shard")
        out = torch.empty(end - begin, dtype=torch.uint8) if into is None else into[: end - begin]
        view, done = memoryview(out.numpy()), 0
        try:
            self._file.seek(self._data_start + begin)
            while done < len(view):  # a read returns at most ~2 GiB on Linux, and less at the end of the file
                n = self._file.readinto(view[done:])
                if not n:
                    size = os.fstat(self._file.fileno()).st_size
                    raise CheckpointError(f"{self.path} is truncated: {key} ends at byte "
                                          f"{self._data_start + end}, the file has {size} now; re-download the shard")
                done += n
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read {key} ({e.strerror or e}); check the disk or "
                                  "re-download the shard") from None
        return out.view(dtype).reshape(shape) if out.numel() else torch.empty(shape, dtype=dtype)

    def close(self) -> None:
        self._file.close()


def _layout(entries: dict[str, tuple[tuple, torch.dtype]], metadata: dict[str, str]):
    """(padded JSON header, name -> (begin, end, shape, dtype), data bytes): decreasing item size, then name."""
    order = sorted(entries, key=lambda k: (-entries[k][1].itemsize, k))
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    slots: dict[str, tuple[int, int, tuple, torch.dtype]] = {}
    off = 0
    for name in order:
        shape, dtype = entries[name]
        end = off + nbytes(shape, dtype)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [off, end]}
        slots[name] = (off, end, tuple(shape), dtype)
        off = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw, slots, off


def shard_file_size(entries: dict[str, tuple[tuple, torch.dtype]], metadata: dict[str, str]) -> int:
    """Bytes of the shard `ShardWriter(path, entries, metadata)` writes."""
    raw, _, data_bytes = _layout(entries, metadata)
    return 8 + len(raw) + data_bytes


def _write_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):  # a nearly full disk may take part of a write; the next part then fails
        done += _pwrite(fd, view[done:], offset + done)


def _pwrite(fd: int, view: memoryview, offset: int) -> int:
    return os.pwrite(fd, view, offset)  # the one place shard bytes reach the disk (tests inject ENOSPC here)
