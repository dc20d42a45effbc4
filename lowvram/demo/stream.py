"""Checkpoint files written piece by piece from seeded random data, so that host RAM stays bounded.

- `RandomSource` makes each tensor as pieces of at most `piece_elems` values of N(mean, std²), piece j of
  tensor `tag` seeded by (seed, tag, j): the bytes depend on the seed and the device type, not on the thread
  count or the order of writing. On the CPU a thread pool fills threads + 2 reused buffers ahead of the
  writer; on a GPU the pieces are made there and copied through a ring of 3 pinned buffers while the
  previous piece is written. Either way the host holds a fixed few pieces of 16 MiB at most.
- `SafetensorsStream` plans a safetensors header from (name, shape, dtype) entries and then takes each
  tensor's bytes in layout order (as safetensors lays them out: larger items first, then by name).
- `PthStream` writes the zip archive of `torch.save` (`<stem>/data.pkl` whose tensors name their storages by
  persistent id, `byteorder`, `data/<i>` per storage, `version`) and streams each storage into its record at
  a 64-byte aligned file offset, so `torch.load(path, mmap=True, weights_only=True)` maps it in place.
  `torch.save` itself needs every tensor in memory at once, 11.4 GB for umT5-xxl.

`rss_reset()` / `rss_peak()` measure a phase's peak resident set (VmHWM) on Linux.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from lowvram.quantize.shards import DTYPE_NAMES

PIECE_ELEMS = 1 << 22  # values per random piece: 8 MiB in bf16, 16 MiB in fp32
PTH_ALIGN = 64  # torch.save's storage alignment inside the zip
_STORAGE = {torch.bfloat16: "BFloat16Storage", torch.float32: "FloatStorage", torch.float16: "HalfStorage"}


@dataclass(frozen=True)
class Init:
    """A tensor's distribution: N(mean, std²)."""
    std: float
    mean: float = 0.0


def rss_reset() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_now() -> int:
    return _status_kib("VmRSS") * 1024


def rss_peak() -> int:
    return _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _piece_seed(seed: int, tag: str, j: int) -> int:
    return (seed * 0x9E3779B1 + zlib.crc32(f"{tag}#{j}".encode())) % (1 << 63)


class RandomSource:
    """Seeded random tensor bytes, piece by piece, made on `device` (cpu or cuda)."""

    def __init__(self, seed: int = 0, device="cpu", piece_elems: int = PIECE_ELEMS, threads: int | None = None,
                 ring: int = 3, staged: bool | None = None):
        self.seed, self.device, self.piece_elems = seed, torch.device(device), piece_elems
        self.threads = max(1, threads or torch.get_num_threads())
        # staged: pieces go through the ring of staging buffers (always on a GPU; on the CPU only to test it)
        self.staged = self.device.type != "cpu" if staged is None else staged
        self._pool = None if self.staged else ThreadPoolExecutor(self.threads)
        self._ring = []  # staging buffers, pinned for a GPU
        self._ring_size = ring
        self._bufs = []  # the thread pool's piece buffers: reused, so RSS never depends on malloc's caching

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def _make(self, tag: str, j: int, n: int, dtype: torch.dtype, init: Init) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(_piece_seed(self.seed, tag, j))
        # one kernel, no fp32 scratch; on the CPU it runs on one thread (the pool gives the parallelism)
        return torch.normal(init.mean, init.std, (n,), generator=g, dtype=dtype, device=self.device)  # [n]

    def pieces(self, tag: str, numel: int, dtype: torch.dtype, init: Init):
        """Yield the tensor's bytes in order as uint8 numpy arrays; each is valid until the next is asked for."""
        sizes = [min(self.piece_elems, numel - s) for s in range(0, numel, self.piece_elems)]
        if self.staged:
            yield from self._staged_pieces(tag, sizes, dtype, init)
        else:
            yield from self._cpu_pieces(tag, sizes, dtype, init)

    def _fill(self, buf: torch.Tensor, tag: str, j: int, n: int, dtype: torch.dtype, init: Init) -> int:
        g = torch.Generator(device=self.device).manual_seed(_piece_seed(self.seed, tag, j))
        torch.normal(init.mean, init.std, (n,), generator=g, out=buf[:n * dtype.itemsize].view(dtype))  # [n]
        return n * dtype.itemsize

    def _cpu_pieces(self, tag, sizes, dtype, init):
        """threads + 2 buffers: the pool fills up to all of them while the caller writes none, else one fewer."""
        while len(self._bufs) < self.threads + 2:
            self._bufs.append(torch.empty(self.piece_elems * 4, dtype=torch.uint8))
        free, ahead, nxt = list(self._bufs), collections.deque(), 0
        while nxt < len(sizes) or ahead:
            while nxt < len(sizes) and free:
                buf = free.pop()
                ahead.append((buf, self._pool.submit(self._fill, buf, tag, nxt, sizes[nxt], dtype, init)))
                nxt += 1
            buf, fut = ahead.popleft()
            yield buf[:fut.result()].numpy()
            free.append(buf)  # the caller has written it

    def _staged_pieces(self, tag, sizes, dtype, init):
        """The device makes piece j+1.. while the caller writes piece j from a host staging buffer."""
        cuda = self.device.type == "cuda"
        while len(self._ring) < self._ring_size:
            self._ring.append(torch.empty(self.piece_elems * 4, dtype=torch.uint8, pin_memory=cuda))
        free, pending, nxt = list(self._ring), collections.deque(), 0

        def launch():
            nonlocal nxt
            buf = free.pop()
            t = self._make(tag, nxt, sizes[nxt], dtype, init).view(torch.uint8)
            buf[:t.numel()].copy_(t, non_blocking=cuda)
            ev = torch.cuda.Event() if cuda else _Landed()
            ev.record()
            pending.append((ev, buf, t.numel()))
            nxt += 1

        while nxt < len(sizes) and free:
            launch()
        while pending:
            ev, buf, n = pending.popleft()
            ev.synchronize()  # the copy into this pinned buffer has landed
            yield buf[:n].numpy()
            free.append(buf)  # the caller has written it
            while nxt < len(sizes) and free:
                launch()


class _Landed:
    """The event of a copy that has already happened (a CPU source)."""

    def record(self):
        pass

    def synchronize(self):
        pass


def _write_pieces(f, pieces, want: int, name: str) -> None:
    got = 0
    for p in pieces:
        f.write(memoryview(p))
        got += p.nbytes
    if got != want:
        raise ValueError(f"{name}: {got} bytes written, {want} planned")


class SafetensorsStream:
    """A safetensors file whose tensors arrive one at a time, in `self.order`."""

    def __init__(self, path, entries: dict[str, tuple[tuple, torch.dtype]], metadata: dict | None = None):
        self.path = Path(path)
        self.order = sorted(entries, key=lambda k: (-entries[k][1].itemsize, k))
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self._sizes, off = {}, 0
        for name in self.order:
            shape, dtype = entries[name]
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            self._sizes[name] = n
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.size = 8 + len(raw) + off
        self._next = 0
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, pieces) -> None:
        if self._next >= len(self.order) or self.order[self._next] != name:
            raise ValueError(f"{self.path.name}: {name} written out of order (expected "
                             f"{self.order[self._next] if self._next < len(self.order) else 'nothing'})")
        _write_pieces(self._f, pieces, self._sizes[name], name)
        self._next += 1

    def close(self) -> None:
        self._f.close()
        if self._next != len(self.order):
            raise RuntimeError(f"{self.path}: {len(self.order) - self._next} tensors never written")


class _Storage:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles as torch.save pickles a contiguous CPU tensor: _rebuild_tensor_v2(storage, 0, size, stride, ...)."""

    def __init__(self, storage: _Storage, shape: tuple):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce_ex__(self, protocol):
        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.append(acc)
            acc *= s
        args = (self.storage, 0, self.shape, tuple(reversed(stride)), False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", getattr(torch, _STORAGE[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


def pth_pickle(entries: dict[str, tuple[tuple, torch.dtype]]) -> bytes:
    """data.pkl of `torch.save({name: tensor})` for contiguous tensors, storage keys "0", "1", ... in order."""
    refs = {name: _TensorRef(_Storage(str(i), dtype, math.prod(shape)), shape)
            for i, (name, (shape, dtype)) in enumerate(entries.items())}
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(refs)
    return buf.getvalue()


class PthStream:
    """A `torch.save` zip archive of {name: tensor} whose storages arrive one at a time, in `self.order`."""

    def __init__(self, path, entries: dict[str, tuple[tuple, torch.dtype]], archive: str | None = None):
        self.path = Path(path)
        self.order = list(entries)
        self._entries = entries
        self._prefix = archive or self.path.stem  # torch.save names the archive after the file
        self._zf = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._record("data.pkl", [pth_pickle(entries)])
        self._record("byteorder", [b"little"])
        self._next = 0

    def _info(self, name: str) -> zipfile.ZipInfo:
        """A stored entry whose data starts at a multiple of PTH_ALIGN (padding in an extra field, as torch does)."""
        zi = zipfile.ZipInfo(f"{self._prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
        zi.compress_type = zipfile.ZIP_STORED
        zi.CRC = zi.compress_size = zi.file_size = 0  # what ZipFile.open(mode="w") starts the header with
        start = self._zf.start_dir + len(zi.FileHeader(True))
        pad = -start % PTH_ALIGN
        if pad:
            pad += PTH_ALIGN if pad < 4 else 0
            zi.extra = struct.pack("<HH", 0x4246, pad - 4) + bytes(pad - 4)  # "FB", miniz's padding id
        assert (self._zf.start_dir + len(zi.FileHeader(True))) % PTH_ALIGN == 0
        return zi

    def _record(self, name: str, pieces) -> None:
        with self._zf.open(self._info(name), "w", force_zip64=True) as w:
            for p in pieces:
                w.write(memoryview(p))

    def write(self, name: str, pieces) -> None:
        if self._next >= len(self.order) or self.order[self._next] != name:
            raise ValueError(f"{self.path.name}: {name} written out of order")
        shape, dtype = self._entries[name]
        want = math.prod(shape) * dtype.itemsize
        got = 0

        def counted():
            nonlocal got
            for p in pieces:
                got += p.nbytes
                yield p

        self._record(f"data/{self._next}", counted())
        if got != want:
            raise ValueError(f"{name}: {got} bytes written, {want} planned")
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.order):
            self._zf.close()
            raise RuntimeError(f"{self.path}: {len(self.order) - self._next} tensors never written")
        self._record("version", [b"3\n"])
        self._zf.close()


def replace_when_done(path: Path):
    """(partial path, commit): write to `<path>.partial`, then commit() renames it onto path."""
    path = Path(path)
    part = path.with_name(path.name + ".partial")

    def commit():
        os.replace(part, path)

    return part, commit
