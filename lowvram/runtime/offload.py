"""Block streaming: non-resident DiT blocks live in host memory and are copied in ahead of use.

Each streamed block (with the modules attached to it, e.g. its audio injector) is packed into ONE
contiguous host slab (page-locked when possible); its parameters and buffers become views into
that slab. `n_buffers` device slabs of the largest streamed size are allocated once and reused.
A dedicated copy stream fills free device slabs with the next streamed blocks (in forward order,
wrapping into the next forward) while the current block computes; CUDA events order copy and
compute. The hooks are forward pre-hooks only: a block's device slab is released at the next
block's pre-hook, so modules attached to it (which run between two blocks) still see its weights.

On device "cpu" the same code runs with synchronous copies and no events, so CI checks
streamed == resident bit-exactly on toy blocks.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from lowvram.constants import ALIGN, GIB
from lowvram.errors import LowvramError

PAGEABLE_WARNING = ("pinned host memory is unavailable ({err}); using pageable memory: host->GPU copies run "
                    "~5x slower (9.3 vs 55 GB/s measured). Raise `ulimit -l`, free RAM or lower pinned_budget_gib")


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _registered(nbytes: int) -> torch.Tensor:
    """`nbytes` of page-locked host memory, exactly: pageable memory faulted in on torch's threads, then
    registered with the driver (cudaHostRegister). torch's `pin_memory=True` goes through its caching host
    allocator, which rounds every allocation up to a power of two (a 5.35 GB KV cache takes 8 GiB) and keeps
    freed blocks for reuse; registered memory costs its size and is unregistered when the last view of it
    dies. Copies from it are asynchronous like those from any page-locked memory (`is_pinned()` is True)."""
    import numpy as np

    arr = np.empty(nbytes, dtype=np.uint8)
    buf = torch.from_numpy(arr)  # the storage holds `arr`: it lives as long as any view of the buffer
    buf.zero_()  # touch every page on all threads: registration then only locks them
    rt = torch.cuda.cudart()
    ptr = arr.ctypes.data
    torch.cuda.check_error(rt.cudaHostRegister(ptr, nbytes, 0))
    # Runs when numpy frees `arr` (after the last tensor view), before its memory goes back to the system.
    weakref.finalize(arr, rt.cudaHostUnregister, ptr).atexit = False
    return buf


def _alloc_host(nbytes: int, pin: bool) -> torch.Tensor:
    if pin:
        return _registered(nbytes)
    return torch.empty(nbytes, dtype=torch.uint8)


def alloc_host(nbytes: int, pin: bool) -> tuple[torch.Tensor, bool]:
    """A uint8 host buffer, page-locked if asked and possible; warns (naming the cost) when it falls back."""
    if pin:
        try:
            return _alloc_host(nbytes, True), True
        except (RuntimeError, MemoryError, AssertionError) as e:  # registration failed: RLIMIT_MEMLOCK, RAM, or no CUDA
            warnings.warn(PAGEABLE_WARNING.format(err=str(e).splitlines()[0]), RuntimeWarning, stacklevel=3)
    return _alloc_host(nbytes, False), False


class CopyEngine:
    """A copy stream plus the events that order it against the compute stream; plain copies on the CPU."""

    def __init__(self, device, stream: "torch.cuda.Stream | None" = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = (stream or torch.cuda.Stream(self.device)) if self.cuda else None
        self.bytes_h2d = 0
        self.bytes_d2h = 0
        self._pending: list[tuple] = []  # (start, end) timing events of copies not yet harvested
        self._spare: list = []
        self.busy_s = 0.0

    def event(self):
        return torch.cuda.Event() if self.cuda else None

    def copying(self):
        """Context in which work is enqueued on the copy stream (nothing on the CPU)."""
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def compute_stream(self):
        return torch.cuda.current_stream(self.device)

    def record_compute(self, ev) -> None:
        if self.cuda:
            ev.record(self.compute_stream())

    def record_copy(self, ev) -> None:
        if self.cuda:
            ev.record(self.stream)

    def copy_waits(self, ev) -> None:
        if self.cuda:
            self.stream.wait_event(ev)

    def compute_waits(self, ev) -> None:
        if self.cuda:
            self.compute_stream().wait_event(ev)

    @contextlib.contextmanager
    def timed(self):
        """Time the copy-stream work enqueued inside (harvested lazily, without synchronizing)."""
        if not self.cuda:
            yield
            return
        pair = self._spare.pop() if self._spare else (torch.cuda.Event(enable_timing=True),
                                                      torch.cuda.Event(enable_timing=True))
        pair[0].record(self.stream)
        yield
        pair[1].record(self.stream)
        self._pending.append(pair)
        if len(self._pending) > 64:
            self._harvest(block=False)

    def _harvest(self, block: bool) -> None:
        while self._pending and (block or self._pending[0][1].query()):
            start, end = self._pending.pop(0)
            end.synchronize()  # orders: host read of the timing below after the copy finished (no-op if done)
            self.busy_s += start.elapsed_time(end) / 1e3
            self._spare.append((start, end))

    def synchronize(self) -> None:
        if self.cuda:
            self.stream.synchronize()  # orders: every enqueued copy finished before the host touches the buffers

    def stats(self) -> dict:
        """Bytes copied each way and the copy stream's busy seconds (waits for pending copies)."""
        self.synchronize()
        self._harvest(block=True)
        return {"bytes_h2d": self.bytes_h2d, "bytes_d2h": self.bytes_d2h, "copy_busy_s": self.busy_s}

    def reset_stats(self) -> None:
        """Zero the counters (after waiting for pending copies, so none is counted later)."""
        self.stats()
        self.bytes_h2d = self.bytes_d2h = 0
        self.busy_s = 0.0


def stream_order(num_blocks: int, heavy: Sequence[int] = ()) -> list[int]:
    """The order in which blocks leave the GPU: light ones first, each group spread evenly so that
    any prefix leaves resident blocks between streamed ones (their compute hides the copies)."""
    heavy = set(heavy)
    return _spread([i for i in range(num_blocks) if i not in heavy]) + _spread(sorted(heavy))


def _spread(items: list[int]) -> list[int]:
    n = len(items)
    if n <= 1:
        return list(items)
    bits = (n - 1).bit_length()
    rev = (int(format(j, f"0{bits}b")[::-1], 2) for j in range(1 << bits))
    return [items[r] for r in rev if r < n]


@dataclass
class _Entry:
    owner: nn.Module
    name: str
    is_param: bool
    shape: torch.Size
    dtype: torch.dtype
    offset: int
    nbytes: int


def _layout(modules: Sequence[nn.Module]) -> tuple[list[_Entry], int]:
    entries, seen, off = [], set(), 0
    for mod in modules:
        for sub in mod.modules():
            tensors = [(n, t, True) for n, t in sub._parameters.items()] + \
                      [(n, t, False) for n, t in sub._buffers.items()]
            for name, t, is_param in tensors:
                if t is None:
                    continue
                if id(t) in seen:
                    raise ValueError(f"tensor {name} is shared inside a streamed block; untie it before streaming")
                seen.add(id(t))
                nbytes = t.numel() * t.element_size()
                entries.append(_Entry(sub, name, is_param, t.shape, t.dtype, off, nbytes))
                off += _align(nbytes)
    return entries, off


def _views(slab: torch.Tensor, layout: list[_Entry]) -> list[torch.Tensor]:
    return [slab[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in layout]


def _point(layout: list[_Entry], views: list[torch.Tensor]) -> None:
    for e, v in zip(layout, views):
        if e.is_param:
            e.owner._parameters[e.name].data = v
        else:
            e.owner._buffers[e.name] = v


def _get(e: _Entry) -> torch.Tensor:
    return e.owner._parameters[e.name] if e.is_param else e.owner._buffers[e.name]


class BlockStreamer:
    """Keeps `resident` blocks on `device` and streams the others through `n_buffers` device slabs.

    blocks: the model's block list, run in order each forward; attached: block index -> modules
    that run right after that block and travel in its slab (e.g. its audio injector); pinned: page-lock
    every host slab (True), none (False), or those of the given block indices (a pinned-memory budget).
    """

    def __init__(self, blocks: Sequence[nn.Module], resident, device, n_buffers: int = 2, pinned=True,
                 attached: Mapping[int, Sequence[nn.Module]] | None = None, copy_stream=None,
                 demote_order: Sequence[int] | None = None):
        if n_buffers < 1:
            raise ValueError("n_buffers must be >= 1")
        self.blocks = list(blocks)
        self.attached = {int(i): list(m) for i, m in (attached or {}).items()}
        self.engine = CopyEngine(device, copy_stream)
        self.device = self.engine.device
        self.pin = self.engine.cuda and pinned is not False  # page-locking only helps copies to a GPU
        self._pin_only = None if isinstance(pinned, bool) else {int(i) for i in pinned}
        self.n_buffers = n_buffers
        n = len(self.blocks)
        self.resident = {int(i) for i in resident}
        if any(not 0 <= i < n for i in self.resident):
            raise ValueError(f"resident block indices must be in 0..{n - 1}")
        self.demote_order = list(demote_order) if demote_order is not None else stream_order(n, list(self.attached))
        self._layouts: dict[int, list[_Entry]] = {}
        self._slabs: dict[int, torch.Tensor] = {}  # host slab of each streamed block
        self._order: list[int] = []
        self._view_cache: dict[tuple, list[torch.Tensor]] = {}
        self.pinned_bytes = self.pageable_bytes = 0
        for i in sorted(self.resident):
            for m in self._unit(i):
                m.to(self.device)
        for i in range(n):
            if i not in self.resident:
                self._make_slab(i)
        self._gpu: list[torch.Tensor] = []
        self._alloc_buffers()
        self._hooks = [b.register_forward_pre_hook(self._make_hook(i)) for i, b in enumerate(self.blocks)]
        self.loads = 0
        self.reset()

    # -------------------------------------------------------------- setup
    def _unit(self, i: int) -> list[nn.Module]:
        return [self.blocks[i], *self.attached.get(i, [])]

    @property
    def streamed(self) -> list[int]:
        return self._order

    def _make_slab(self, i: int) -> None:
        layout, total = _layout(self._unit(i))
        want = self.pin and (self._pin_only is None or i in self._pin_only)
        slab, pinned = alloc_host(max(total, 1), want)
        self.pin = self.pin and (pinned or not want)  # after one failure, stop retrying (and warning) for every slab
        if pinned:
            self.pinned_bytes += slab.numel()
        else:
            self.pageable_bytes += slab.numel()
        views = _views(slab, layout)
        for e, v in zip(layout, views):
            v.copy_(_get(e))  # the block's own tensors (host or device) into the slab, once
        _point(layout, views)  # the old storage is freed when nothing else references it
        self._layouts[i], self._slabs[i] = layout, slab
        self._order = sorted(self._slabs)  # streamed blocks in forward order

    def _alloc_buffers(self) -> None:
        need = max((s.numel() for s in self._slabs.values()), default=0)
        count = min(self.n_buffers, len(self._slabs))
        if self._gpu and self._gpu[0].numel() >= need and len(self._gpu) == count:
            return
        self._gpu = [torch.empty(need, dtype=torch.uint8, device=self.device) for _ in range(count)]
        self._loaded = [self.engine.event() for _ in range(count)]  # copy into buffer b finished
        self._freed = [self.engine.event() for _ in range(count)]  # compute reading buffer b finished
        for ev in self._freed:  # orders: earlier compute-stream use of this (recycled) memory before the first copy
            self.engine.record_compute(ev)
        self._view_cache.clear()

    def _buffer_views(self, i: int, b: int) -> list[torch.Tensor]:
        layout = self._layouts[i]
        key = (tuple((e.shape, e.dtype, e.offset) for e in layout), b)  # blocks with one layout share views
        if key not in self._view_cache:
            self._view_cache[key] = _views(self._gpu[b], layout)
        return self._view_cache[key]

    # -------------------------------------------------------------- run time
    def reset(self) -> None:
        """Forget in-flight prefetches (after an aborted forward); the next block loads on demand."""
        self.engine.synchronize()
        self._free = list(range(len(self._gpu)))
        self._inflight: dict[int, int] = {}  # streamed block -> buffer holding (or receiving) it
        self._running: tuple[int, int] | None = None
        self._next = 0  # position in self.streamed of the next block to prefetch

    def _make_hook(self, i: int) -> Callable:
        def hook(module, args):
            self._before_block(i)
        return hook

    def _load(self, i: int, b: int) -> None:
        slab = self._slabs[i]
        with self.engine.copying():
            self.engine.copy_waits(self._freed[b])  # orders: the last block computed from buffer b before overwriting it
            with self.engine.timed():
                self._gpu[b][:slab.numel()].copy_(slab, non_blocking=True)
            self.engine.record_copy(self._loaded[b])
        self.engine.bytes_h2d += slab.numel()
        self.loads += 1
        self._inflight[i] = b
        order = self.streamed
        self._next = (order.index(i) + 1) % len(order)

    def _prefetch(self) -> None:
        order = self.streamed
        while self._free and order:
            cand = order[self._next]
            if cand in self._inflight or (self._running and self._running[0] == cand):
                break
            self._load(cand, self._free.pop(0))

    def _before_block(self, i: int) -> None:
        if self._running is not None:  # everything of the previous block (and its attached modules) is enqueued
            _, b = self._running
            self.engine.record_compute(self._freed[b])  # orders: that compute before the next copy into buffer b
            self._free.append(b)
            self._running = None
        if i in self._slabs:
            if i not in self._inflight:  # out of order or first call: make room and load it now
                if not self._free:
                    victim = next(reversed(self._inflight))
                    self._free.append(self._inflight.pop(victim))
                self._load(i, self._free.pop(0))
            b = self._inflight.pop(i)
            self._running = (i, b)
            self._prefetch()
            self.engine.compute_waits(self._loaded[b])  # orders: block i's slab copy before its kernels
            _point(self._layouts[i], self._buffer_views(i, b))
        else:
            self._prefetch()

    # -------------------------------------------------------------- OOM fallback and teardown
    def demote_one(self, measured_peak_bytes: int | None = None) -> int:
        """Move one more resident block to streaming (after a CUDA OOM); returns its index."""
        cand = [i for i in self.demote_order if i in self.resident]
        if not cand:
            peak = measured_peak_bytes
            if peak is None and self.engine.cuda:
                peak = torch.cuda.max_memory_reserved(self.device)
            seen = f"{peak / GIB:.1f} GiB" if peak is not None else "unknown"
            raise LowvramError(f"out of GPU memory with every DiT block already streamed (measured peak {seen}); "
                               "use a smaller --size, --set kv_placement=host kv_dtype=int8, --set t5=cpu, "
                               "or a card with more memory")
        i = cand[0]
        if self.engine.cuda:
            torch.cuda.synchronize(self.device)  # orders: kernels of the failed forward that read block i before it moves
        self.reset()
        self.resident.discard(i)
        if self._pin_only is not None:  # a block demoted at run time is page-locked too (one slab more)
            self._pin_only.add(i)
        self._make_slab(i)
        self._alloc_buffers()
        self.reset()
        return i

    def stats(self) -> dict:
        """Copy statistics for the benchmark: bytes, copy-stream busy time, block loads."""
        return {**self.engine.stats(), "loads": self.loads, "streamed": len(self._slabs),
                "pinned_bytes": self.pinned_bytes, "pageable_bytes": self.pageable_bytes}

    def reset_stats(self) -> None:
        self.engine.reset_stats()
        self.loads = 0

    def remove(self) -> None:
        """Uninstall the hooks; streamed blocks are left pointing at their host slabs."""
        self.engine.synchronize()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for i, slab in self._slabs.items():
            _point(self._layouts[i], _views(slab, self._layouts[i]))
        self._gpu, self._view_cache = [], {}


def apply_block_streaming(model_blocks: Sequence[nn.Module], plan, device=None,
                          attached: Mapping[int, Sequence[nn.Module]] | None = None) -> BlockStreamer:
    """Install streaming on `model_blocks` as the plan says (resident set, buffers, pinning)."""
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return BlockStreamer(model_blocks, plan.resident, device, n_buffers=max(plan.n_buffers, 1),
                         pinned=set(plan.pinned_blocks), attached=attached,
                         demote_order=plan.demote_order)


def retry_on_oom(forward: Callable, streamer: BlockStreamer, log: Callable[[str], None] = print):
    """Run forward(); on a CUDA OOM demote one block to streaming and run it again (until none is left)."""
    while True:
        try:
            return forward()
        except torch.cuda.OutOfMemoryError:
            i = streamer.demote_one()
            if streamer.engine.cuda:
                torch.cuda.empty_cache()
            log(f"CUDA out of memory: block {i} now streams ({len(streamer.streamed)} streamed); retrying the forward")
