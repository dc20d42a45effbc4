"""Per-step KV ring caches: on the GPU, or in host memory streamed layer by layer.

The model calls, per forward and per layer:
    cache.begin_forward(start, n_new)      # n_new tokens written at ring offset start % capacity
    k_win, v_win = cache.update(layer, k_new, v_new)   # [B, end, H, D] views of the window
    cache.done(layer)                      # attention of this layer finished with the window
A batched DiT call over B caches (the steps of one tick) begins them together with
`begin_forwards(caches, starts, n_new)` and then, per layer, calls update/done of cache 0, 1, ..., B-1.
The window is [0, end) with end = start + n_new until the ring first wraps (an absolute start
>= capacity, or a cache already full), the whole cache after. The sink K/V are not in these caches; for the sdpa
path a bf16 cache built with room for them (GpuKVCache(sink=), a KVWorkspace(sink=)) writes the roped sink
behind a layer's window after `update`, and `joined` returns [window; sink] as views, sparing torch.cat's copy.

`HostKVCache` keeps all layers in one host allocation (page-locked when possible) and works in a ring
of `n_slots` device windows shared by the step caches of a model (`KVWorkspace`). A call over B host
caches reads its windows in the order (layer 0: cache 0..B-1), (layer 1: cache 0..B-1), ...: window
p = layer * B + j lives in slot p % n_slots. A copy stream fetches the first n_slots windows when the
call begins (all of a window but the chunk the forward writes); after `done` of window p a second
stream writes its new chunk back (PCIe is full duplex) and the first fetches window p + n_slots into
the freed slot. B = 1 is the unbatched forward (slot = layer % n_slots); `n_slots` = B + 1 keeps one
layer's windows and the next one in flight.
Host formats (HostKVCache's kv_dtype, a KVFormat value):
- bf16: the windows are copied as they are.
- int8: per-token-per-head absmax INT8 (fp32 scales, kernels/rowquant.py), halving the traffic; windows are
  dequantized to bf16 on the device after the copy, through one staging buffer on the copy stream (its copies
  run one after another, so one buffer serves every window), and new chunks quantized on the write-back stream,
  each in one pass on the GPU (kernels/kvquant.py, rowquant's bits).
- kv8: the 8-bit attention kernel's format (kernels/attention8.py, attention "triton8"), the same bytes over PCIe
  as int8; a window lands in a slot that the kernel reads as it is, with no dequantization. The host keeps K and
  V token-major with their scales, as int8 does (so a window's token ranges are contiguous copies; the kernel's
  V layout, [B, H, D, L], would make each range H*D strided rows, which torch copies only through a contiguous
  temporary). K is copied straight into the slot (the kernel's K is token-major too); V and the two scales go
  through one staging buffer and are relaid on the copy stream into the kernel's token-contiguous layout: a
  byte transpose of V, a third of the device traffic of int8's dequantization. The write-back relays the new
  chunk's V and scales back to token-major on the write-back stream. Each layer's K smoothing mean is fixed
  at the cache's first write, as GpuKV8Cache does, and stays on the device (L x B x H x D fp32, 0.8 MB a
  cache at full size: no PCIe bytes), so host and GPU kv8 caches fed the same chunks hold the same bytes and
  the kernel's outputs are bit-identical (tests/test_kv_cache.py).
"""

from __future__ import annotations

import weakref
from enum import Enum

import torch

from lowvram.kernels.kvquant import dequantize_heads, quantize_heads_int8
from lowvram.runtime.offload import ALIGN, CopyEngine, alloc_host

SCALE_BYTES = 4  # fp32 per-token-per-head scale of the INT8 and kv8 caches


class KVFormat(str, Enum):
    """How a step cache (or the sink) stores K and V."""

    BF16 = "bf16"  # the compute dtype (GPU caches, host caches of bf16 profiles)
    INT8 = "int8"  # per-(token, head) absmax INT8 + fp32 scales (host caches; the INT8 sink)
    KV8 = "kv8"  # the 8-bit attention kernel's (GPU and host caches): INT8 K smoothed by a fixed mean, INT8 V

    def __str__(self) -> str:
        return self.value


def kv_token_bytes(heads: int, head_dim: int, kv_format: str) -> int:
    """K + V bytes of one token of one layer (kv8's per-layer K mean: kv8_mean_bytes)."""
    if KVFormat(kv_format) in (KVFormat.INT8, KVFormat.KV8):
        return 2 * (heads * head_dim + heads * SCALE_BYTES)
    return 2 * heads * head_dim * 2


def kv8_mean_bytes(num_layers: int, batch: int, heads: int, head_dim: int) -> int:
    """Device bytes of one kv8 cache's K smoothing means: fp32 [B, H, D] per layer, on the device wherever the
    cache lives."""
    return num_layers * batch * heads * head_dim * 4


def kv_workspace_bytes(capacity: int, max_new: int, heads: int, head_dim: int, kv_dtype: str,
                       n_slots: int = 2, batch: int = 1, sink: int = 0) -> int:
    """Device bytes of a KVWorkspace of `n_slots` windows of `batch` samples (= KVWorkspace's allocation).
    bf16: bf16 windows (each with `sink` more tokens for the sink behind it, HostKVCache.joined). int8: the
    same, one staging buffer and one write-back chunk (used by one copy at a time on their streams, whatever
    the number of caches in a call) and the fp32 temporaries of quantizing that chunk. kv8: windows in the
    kernel's format and one staging buffer and one write-back chunk of V and the two scales (their relayouts
    are copies, with no temporaries; the kernel reads the sink where it is, so no sink tokens)."""
    hd = heads * head_dim
    if KVFormat(kv_dtype) == KVFormat.KV8:
        staged = hd + 2 * heads * SCALE_BYTES  # V int8 and the K and V scales of one token, token-major
        return (n_slots * batch * capacity * kv_token_bytes(heads, head_dim, kv_dtype)
                + batch * (capacity + max_new) * staged)
    total = n_slots * 2 * batch * (capacity + sink) * hd * 2
    if KVFormat(kv_dtype) == KVFormat.INT8:
        total += batch * (capacity + max_new) * kv_token_bytes(heads, head_dim, "int8")
        total += 3 * batch * max_new * hd * 4  # fp32 temporaries of quantizing the new chunk
    return total


def slots_for(batch: int, layers_ahead: int = 2) -> int:
    """Ring slots of a workspace whose calls run `batch` host caches: one layer's windows and
    layers_ahead - 1 more (batch 1: layers_ahead layers in flight, as the unbatched forward)."""
    return batch + layers_ahead - 1


class _Ring:
    def __init__(self, num_layers: int, capacity: int):
        self.num_layers, self.capacity = num_layers, capacity
        self.reset()

    def reset(self) -> None:
        """Empty the cache (a new video)."""
        self._filled = 0
        self.off = self.n_new = self.end = 0

    def begin_forward(self, start: int, n_new: int) -> None:
        off = start % self.capacity
        if n_new <= 0 or off + n_new > self.capacity:
            raise ValueError(f"chunk [{off}, {off + n_new}) does not fit the ring of {self.capacity} tokens")
        if start >= self.capacity:
            self._filled = self.capacity
        self._filled = max(self._filled, off + n_new)
        self.off, self.n_new, self.end = off, n_new, self._filled


class GpuKVCache(_Ring):
    """All layers' K and V on the device; update writes in place and returns views. With `sink` > 0 each layer
    has room for that many sink tokens behind its ring (capacity + sink tokens), for `joined`."""

    def __init__(self, num_layers: int, capacity: int, batch: int, heads: int, head_dim: int,
                 dtype=torch.bfloat16, device="cuda", sink: int = 0):
        self.sink = sink
        self.k = torch.empty(num_layers, batch, capacity + sink, heads, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self._positions = None
        super().__init__(num_layers, capacity)

    def reset(self) -> None:
        super().reset()
        # per layer, the sink V in the room behind the full ring: (a weak reference to it, its version), or None
        self._sink_v = [None] * self.num_layers

    def positions(self) -> torch.Tensor:
        """0 .. capacity - 1 on the cache's device, made once: a chunk's token positions as a slice of it, for
        FullWindowWrites (copying a slice on the device, where building them on the host would be a copy to it)."""
        if self._positions is None:
            self._positions = torch.arange(self.capacity, device=self.k.device)
        return self._positions

    def nbytes(self) -> int:
        """Device bytes held (the planner's KV ring caches and, with `sink`, their sink room)."""
        return 2 * self.k.numel() * self.k.element_size()

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
        # k_new, v_new: [B, n_new, H, D] -> windows [B, end, H, D]
        a, b = self.off, self.off + self.n_new
        self.k[layer, :, a:b].copy_(k_new)
        self.v[layer, :, a:b].copy_(v_new)
        return self.k[layer, :, :self.end], self.v[layer, :, :self.end]

    def room(self, layer: int, ls: int, dtype: torch.dtype):
        """After update(layer): where joined puts Ls roped sink keys, a [B, Ls, H, D] view for the RoPE pass to
        write (then joined copies no K); None where joined would not join."""
        if ls > self.sink or dtype != self.k.dtype:
            return None
        return self.k[layer, :, self.end:self.end + ls]

    def joined(self, layer: int, k_sink: torch.Tensor, v_sink: torch.Tensor):
        """After update(layer): the window followed by the sink in the layer's own buffer, K and V [B, end + Ls, H,
        D] views for one SDPA call (the same keys in the same order as torch.cat([window, sink]), HostKVCache.
        joined's contract). k_sink: roped, [B, Ls, H, D], possibly already in place (`room`). None where there is
        no room for Ls tokens (a cache built without `sink`) or the sink is not in the cache's dtype (torch.cat
        would promote). Once the ring is full nothing else writes the room, so a V sink that is already there (the
        same tensor, unmodified: the bf16 sink's layer, call after call) is not copied again."""
        ls, e = k_sink.shape[1], self.end
        room = self.room(layer, ls, k_sink.dtype)
        if room is None or v_sink.dtype != self.k.dtype:
            return None
        # tokens [end, end + Ls) are no part of this forward's window: before the ring first fills they are not
        # yet written, and a streaming caller's next chunk starts at end (_Ring.begin_forward: off = end until
        # the wrap), so its update overwrites them before any window reads them; once full (end = capacity) they
        # are the room alone. A caller that skipped ahead (off > end) would read the stale sink where the
        # cache without room gives unwritten memory: both are garbage to it.
        if k_sink.data_ptr() != room.data_ptr():  # else roped into the room by the caller
            room.copy_(k_sink)
        held = self._sink_v[layer]
        if e != self.capacity or held is None or held[0]() is not v_sink or held[1] != v_sink._version:
            self.v[layer, :, e:e + ls].copy_(v_sink)
            # before the ring is full the next chunk overwrites the room (it starts at end): nothing to keep
            self._sink_v[layer] = (weakref.ref(v_sink), v_sink._version) if e == self.capacity else None
        return self.k[layer, :, :e + ls], self.v[layer, :, :e + ls]

    def done(self, layer: int) -> None:
        pass


class FullWindowWrites:
    """A full GpuKVCache as a captured call sees it (runtime/graphs.py): the new chunk written at token positions
    held on the device (`pos`, [n_new] int64, copied in before each replay) by index_copy_, the same bytes update's
    slice copy writes, and the window the whole ring, which it is once the ring is full, so that one graph serves
    every offset of the ring. joined and done are the cache's (its end is the capacity)."""

    def __init__(self, cache: GpuKVCache, pos: torch.Tensor):
        if cache.end != cache.capacity:
            raise ValueError("FullWindowWrites needs a full ring (its window is the whole cache)")
        self.cache, self.pos = cache, pos

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
        c = self.cache
        c.k[layer].index_copy_(1, self.pos, k_new)
        c.v[layer].index_copy_(1, self.pos, v_new)
        return c.k[layer, :, :c.capacity], c.v[layer, :, :c.capacity]

    def room(self, layer: int, ls: int, dtype: torch.dtype):
        return self.cache.room(layer, ls, dtype)

    def joined(self, layer: int, k_sink: torch.Tensor, v_sink: torch.Tensor):
        return self.cache.joined(layer, k_sink, v_sink)

    def done(self, layer: int) -> None:
        pass


class KVWorkspace:
    """A ring of `n_slots` device windows (and the staging of the 8-bit formats) shared by the host caches of one
    model, all of one format; one DiT call at a time, over one or several of those caches (see the module
    docstring for the order and the formats)."""

    def __init__(self, capacity: int, batch: int, heads: int, head_dim: int, device, n_slots: int = 2,
                 kv_format: str = "bf16", max_new: int | None = None, copy_stream=None,
                 engine: CopyEngine | None = None, sink: int = 0):
        self.engine = engine or CopyEngine(device, copy_stream)  # host -> device windows
        self.wb = CopyEngine(device)  # device -> host write-back, on its own stream
        dev = self.engine.device
        self.shape = (batch, capacity, heads, head_dim)
        self.n_slots, self.fmt = n_slots, KVFormat(kv_format)
        self.sink = 0  # sink tokens a bf16 window slot has room for behind the window (kv8: none)
        self.max_new = max_new or capacity
        B, H, D, n = batch, heads, head_dim, self.max_new
        i8, f32 = torch.int8, torch.float32
        if self.fmt == KVFormat.KV8:
            # slot s in the kernel's layout: K k8[s] [B, cap, H, D], V v8[s] [B, H, D, cap], the K and V scales
            # s8[s] [2, B, H, cap]; staged token-major (the host's layout): a window's V and scales, a chunk's
            self.k8 = torch.empty(n_slots, B, capacity, H, D, dtype=i8, device=dev)
            self.v8 = torch.empty(n_slots, B, H, D, capacity, dtype=i8, device=dev)
            self.s8 = torch.empty(n_slots, 2, B, H, capacity, dtype=f32, device=dev)
            self.stage_v = torch.empty(B, capacity, H, D, dtype=i8, device=dev)
            self.stage_s = torch.empty(2, B, capacity, H, dtype=f32, device=dev)
            self.wb_v = torch.empty(B, n, H, D, dtype=i8, device=dev)
            self.wb_s = torch.empty(2, B, n, H, dtype=f32, device=dev)
            self._held = [self.k8, self.v8, self.s8, self.stage_v, self.stage_s, self.wb_v, self.wb_s]
        else:
            # window in slot s: kv[s, 0] = K, kv[s, 1] = V, each [B, capacity + sink, H, D] bf16; the last `sink`
            # tokens hold the sink behind a window for one SDPA call (HostKVCache.joined)
            self.sink = sink
            self.kv = torch.empty(n_slots, 2, B, capacity + sink, H, D, dtype=torch.bfloat16, device=dev)
            self._held = [self.kv]
        if self.fmt == KVFormat.INT8:
            self.stage_q = torch.empty(2, *self.shape, dtype=i8, device=dev)
            self.stage_s = torch.empty(2, *self.shape[:3], dtype=f32, device=dev)
            self.wb_q = torch.empty(2, B, n, H, D, dtype=i8, device=dev)
            self.wb_s = torch.empty(2, B, n, H, dtype=f32, device=dev)
            self._held += [self.stage_q, self.stage_s, self.wb_q, self.wb_s]
        self.loaded = [self.engine.event() for _ in range(n_slots)]  # window copy into slot s finished
        self.freed = [self.engine.event() for _ in range(n_slots)]  # attention reading slot s finished
        self.read = [self.engine.event() for _ in range(n_slots)]  # write-back reading slot s finished
        self.start = self.engine.event()
        self.wb_tail = self.engine.event()
        self.group: list[HostKVCache] = []  # the host caches of the call in flight, in sample order

    def nbytes(self) -> int:
        """Device bytes held (kv_workspace_bytes plans these plus int8's write-back temporaries)."""
        return sum(t.numel() * t.element_size() for t in self._held)

    def begin(self, caches: list["HostKVCache"]) -> None:
        """A DiT call over `caches` (their rings already advanced): order it after earlier calls and fetch
        the first windows."""
        e = self.engine
        e.record_compute(self.start)
        e.copy_waits(self.start)  # orders: earlier calls' reads of the shared slots before these prefetches
        self.wb.record_copy(self.wb_tail)
        e.copy_waits(self.wb_tail)  # orders: earlier write-backs landed in host memory before windows are read
        self.group = list(caches)
        for j, c in enumerate(self.group):
            c._sample = j
        for p in range(min(self.n_slots, self.group[0].num_layers * len(self.group))):
            self._prefetch(p)

    def slot(self, cache: "HostKVCache", layer: int) -> int:
        """The slot of cache's window of `layer` in the call in flight."""
        j = cache._sample
        if j >= len(self.group) or self.group[j] is not cache:
            raise ValueError("a host cache was used in a call it did not begin (begin_forward/begin_forwards)")
        return (layer * len(self.group) + j) % self.n_slots

    def window8(self, s: int, k_mean: torch.Tensor, mean_ready: bool):
        """Slot s as a kernels.attention8.KV8Cache of `capacity` tokens with a cache's K mean of one layer."""
        from lowvram.kernels.attention8 import KV8Cache

        return KV8Cache(self.k8[s], self.s8[s, 0], self.v8[s], self.s8[s, 1], k_mean, mean_ready)

    def _prefetch(self, p: int) -> None:
        """Window p of the call (layer p // B of cache p % B) into slot p % n_slots, on the copy stream."""
        layer, j = divmod(p, len(self.group))
        c, e, s = self.group[j], self.engine, p % self.n_slots
        with e.copying():
            e.copy_waits(self.freed[s])  # orders: the attention that last read slot s before overwriting it
            e.copy_waits(self.read[s])  # orders: the write-back that last read slot s before overwriting it
            with e.timed():
                for x, y in c._ranges():
                    self._fetch(c, layer, s, x, y)
            e.record_copy(self.loaded[s])
        tok = sum(y - x for x, y in c._ranges())
        e.bytes_h2d += tok * self.shape[0] * kv_token_bytes(self.shape[2], self.shape[3], self.fmt)

    def _fetch(self, c: "HostKVCache", layer: int, s: int, x: int, y: int) -> None:
        """Tokens [x, y) of c's window of `layer` into slot s, enqueued on the copy stream."""
        B = self.shape[0]
        if self.fmt == KVFormat.BF16:
            for kv in range(2):
                for b in range(B):
                    self.kv[s, kv, b, x:y].copy_(c.host[layer, kv, b, x:y], non_blocking=True)
        elif self.fmt == KVFormat.INT8:
            for kv in range(2):
                for b in range(B):
                    self.stage_q[kv, b, x:y].copy_(c.host_q[layer, kv, b, x:y], non_blocking=True)
                    self.stage_s[kv, b, x:y].copy_(c.host_s[layer, kv, b, x:y], non_blocking=True)
            # on the copy stream, right behind its copy (the next copy into stage waits for it)
            dequantize_heads(self.stage_q[:, :, x:y], self.stage_s[:, :, x:y], out=self.kv[s, :, :, x:y])
        else:  # kv8: K straight into the slot; V and the scales through the staging, relaid for the kernel
            for b in range(B):
                self.k8[s, b, x:y].copy_(c.host_q[layer, 0, b, x:y], non_blocking=True)
                self.stage_v[b, x:y].copy_(c.host_q[layer, 1, b, x:y], non_blocking=True)
                for kv in range(2):
                    self.stage_s[kv, b, x:y].copy_(c.host_s[layer, kv, b, x:y], non_blocking=True)
            self.v8[s, ..., x:y].copy_(self.stage_v[:, x:y].permute(0, 2, 3, 1))  # [B, n, H, D] -> [B, H, D, n]
            self.s8[s, ..., x:y].copy_(self.stage_s[:, :, x:y].transpose(2, 3))  # [2, B, n, H] -> [2, B, H, n]

    def done(self, cache: "HostKVCache", layer: int) -> None:
        """The attention of window (layer, cache) is enqueued: write its new chunk back, fetch the window
        n_slots ahead into its slot."""
        s = self.slot(cache, layer)
        p = layer * len(self.group) + cache._sample
        wb, a, n = self.wb, cache.off, cache.n_new
        self.engine.record_compute(self.freed[s])  # orders: the chunk write and the attention before write-back and refill
        with wb.copying():
            wb.copy_waits(self.freed[s])
            with wb.timed():
                self._write_back(cache, layer, s, a, n)
        wb.bytes_d2h += n * self.shape[0] * kv_token_bytes(self.shape[2], self.shape[3], self.fmt)
        if p + self.n_slots < cache.num_layers * len(self.group):
            self._prefetch(p + self.n_slots)

    def _write_back(self, c: "HostKVCache", layer: int, s: int, a: int, n: int) -> None:
        """Tokens [a, a + n) of slot s into c's host memory, enqueued on the write-back stream; records read[s]
        as soon as the slot itself has been read."""
        B, wb = self.shape[0], self.wb
        if self.fmt == KVFormat.BF16:
            for kv in range(2):
                for b in range(B):
                    c.host[layer, kv, b, a:a + n].copy_(self.kv[s, kv, b, a:a + n], non_blocking=True)
            wb.record_copy(self.read[s])
            return
        if self.fmt == KVFormat.INT8:
            quantize_heads_int8(self.kv[s, :, :, a:a + n], self.wb_q[:, :, :n], self.wb_s[:, :, :n])
            wb.record_copy(self.read[s])  # slot s may be refilled once its chunk is quantized
            for kv in range(2):
                for b in range(B):
                    c.host_q[layer, kv, b, a:a + n].copy_(self.wb_q[kv, b, :n], non_blocking=True)
                    c.host_s[layer, kv, b, a:a + n].copy_(self.wb_s[kv, b, :n], non_blocking=True)
            return
        # kv8: V and the scales relaid token-major for the host, K straight from the slot
        self.wb_v[:, :n].copy_(self.v8[s, ..., a:a + n].permute(0, 3, 1, 2))  # [B, H, D, n] -> [B, n, H, D]
        self.wb_s[:, :, :n].copy_(self.s8[s, ..., a:a + n].transpose(2, 3))  # [2, B, H, n] -> [2, B, n, H]
        for b in range(B):
            c.host_q[layer, 0, b, a:a + n].copy_(self.k8[s, b, a:a + n], non_blocking=True)
        wb.record_copy(self.read[s])  # slot s may be refilled once its chunk is relaid and its K copied out
        for b in range(B):
            c.host_q[layer, 1, b, a:a + n].copy_(self.wb_v[b, :n], non_blocking=True)
            for kv in range(2):
                c.host_s[layer, kv, b, a:a + n].copy_(self.wb_s[kv, b, :n], non_blocking=True)


class HostKVCache(_Ring):
    """All layers in host memory (one allocation); windows streamed through a KVWorkspace of the same format.
    kv_dtype: the format (module docstring); with kv8, update returns the window as a KV8Cache view and None."""

    def __init__(self, num_layers: int, capacity: int, batch: int, heads: int, head_dim: int,
                 kv_dtype: str = "bf16", device="cuda", workspace: KVWorkspace | None = None, n_slots: int = 2,
                 pinned: bool = True, max_new: int | None = None):
        if kv_dtype not in tuple(KVFormat):
            raise ValueError(f"kv_dtype must be bf16, int8 or kv8, not {kv_dtype!r}")
        self.fmt = KVFormat(kv_dtype)
        self.ws = workspace or KVWorkspace(capacity, batch, heads, head_dim, device, n_slots, self.fmt, max_new)
        if self.ws.shape != (batch, capacity, heads, head_dim) or self.ws.fmt != self.fmt:
            raise ValueError(f"the workspace was built for another cache shape or format ({self.ws.fmt}, not "
                             f"{self.fmt})")
        self.engine = self.ws.engine
        self._sample = 0  # this cache's place in the workspace's call in flight
        full = (num_layers, 2, batch, capacity, heads)
        n_q = num_layers * 2 * batch * capacity * heads * head_dim
        if self.fmt != KVFormat.BF16:  # int8 and kv8: one layout (K, V token-major), K smoothed in kv8
            q_bytes = -(-n_q // ALIGN) * ALIGN
            raw, self.pinned = alloc_host(q_bytes + n_q // head_dim * 4, pinned and self.engine.cuda)
            self.host_q = raw[:n_q].view(torch.int8).view(*full, head_dim)  # [L, 2, B, cap, H, D]
            self.host_s = raw[q_bytes:].view(torch.float32).view(full)  # [L, 2, B, cap, H]
        else:
            raw, self.pinned = alloc_host(n_q * 2, pinned and self.engine.cuda)
            self.host = raw.view(torch.bfloat16).view(*full, head_dim)  # [L, 2, B, cap, H, D]
        self.nbytes = raw.numel()
        if self.fmt == KVFormat.KV8:  # the K smoothing mean of each layer, on the device (module docstring)
            self.k_mean = torch.zeros(num_layers, batch, heads, head_dim, dtype=torch.float32,
                                      device=self.engine.device)
        super().__init__(num_layers, capacity)

    def reset(self) -> None:
        """Empty the cache; with kv8 the next first write of each layer fixes a new smoothing mean."""
        super().reset()
        self.mean_ready = [False] * self.num_layers

    def _ranges(self) -> list[tuple[int, int]]:
        """Token ranges of the window to fetch: all of [0, end) but the chunk this forward writes."""
        a, b = self.off, self.off + self.n_new
        return [(x, y) for x, y in ((0, a), (b, self.end)) if y > x]

    def _advance(self, start: int, n_new: int) -> None:
        super().begin_forward(start, n_new)
        if self.n_new > self.ws.max_new and self.fmt != KVFormat.BF16:
            raise ValueError(f"n_new {n_new} exceeds the workspace's max_new {self.ws.max_new}")

    def begin_forward(self, start: int, n_new: int) -> None:
        """An unbatched forward (a call over this cache alone)."""
        self._advance(start, n_new)
        self.ws.begin([self])

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
        # k_new, v_new: [B, n_new, H, D] -> windows [B, end, H, D] bf16 on the device (kv8: a KV8Cache, None)
        ws = self.ws
        s = ws.slot(self, layer)
        self.engine.compute_waits(ws.loaded[s])  # orders: the window's copy (and dequantization, relayout) before use
        if self.fmt == KVFormat.KV8:
            from lowvram.kernels.attention8 import kv8_window, kv8_write

            win = ws.window8(s, self.k_mean[layer], self.mean_ready[layer])
            kv8_write(win, self.off, k_new, v_new)  # the first write of a layer fixes its mean, as GpuKV8Cache
            self.mean_ready[layer] = True
            return kv8_window(win, self.end), None
        a, b = self.off, self.off + self.n_new
        ws.kv[s, 0, :, a:b].copy_(k_new)
        ws.kv[s, 1, :, a:b].copy_(v_new)
        return ws.kv[s, 0, :, :self.end], ws.kv[s, 1, :, :self.end]

    def room(self, layer: int, ls: int, dtype: torch.dtype):
        """After update(layer): where joined puts Ls roped sink keys in the window's slot, a [B, Ls, H, D] view for
        the RoPE pass to write (then joined copies no K); None where joined would not join."""
        ws = self.ws
        if self.fmt == KVFormat.KV8 or ls > ws.sink or dtype != ws.kv.dtype:
            return None
        return ws.kv[ws.slot(self, layer), 0, :, self.end:self.end + ls]

    def joined(self, layer: int, k_sink: torch.Tensor, v_sink: torch.Tensor):
        """After update(layer): the window followed by the sink in the window's own slot, K and V [B, end + Ls, H,
        D] views for one SDPA call without concatenating them (the same keys in the same order as
        torch.cat([window, sink])). k_sink: roped, [B, Ls, H, D], possibly already in place (`room`). None where
        the slot has no room for Ls tokens (kv8, or a workspace built without sink tokens) or the sink is not in
        the windows' dtype (bf16: an fp32 model's attention runs on the concatenation, which torch.cat promotes to
        fp32). The slots serve every layer in turn, so the V sink is written each time."""
        ls, ws = k_sink.shape[1], self.ws
        room = self.room(layer, ls, k_sink.dtype)
        if room is None or v_sink.dtype != ws.kv.dtype:
            return None
        s, e = ws.slot(self, layer), self.end
        # on the compute stream after update's wait for the slot's window; the tokens [end, end + Ls) are no
        # part of any window copy or write-back of this use of the slot, and the next use's copies wait for done
        if k_sink.data_ptr() != room.data_ptr():  # else roped into the room by the caller
            room.copy_(k_sink)
        ws.kv[s, 1, :, e:e + ls].copy_(v_sink)
        return ws.kv[s, 0, :, :e + ls], ws.kv[s, 1, :, :e + ls]

    def done(self, layer: int) -> None:
        self.ws.done(self, layer)

    def reset_stats(self) -> None:
        self.engine.reset_stats()
        self.ws.wb.reset_stats()

    def stats(self) -> dict:
        """Bytes each way and busy seconds of the two copy streams (shared by the workspace's caches)."""
        h2d, d2h = self.engine.stats(), self.ws.wb.stats()
        return {"bytes_h2d": h2d["bytes_h2d"], "bytes_d2h": d2h["bytes_d2h"], "copy_busy_s": h2d["copy_busy_s"],
                "writeback_busy_s": d2h["copy_busy_s"]}


def begin_forwards(caches, starts, n_new: int) -> None:
    """Begin one batched DiT call: cache j receives n_new tokens at absolute token starts[j]. The caches must
    be distinct (one call writes each ring once); the host caches among them must share one workspace, whose
    ring then holds their windows in call order (module docstring)."""
    if len({id(c) for c in caches}) != len(caches):
        raise ValueError("a step cache appears twice in one batched call; a call runs distinct steps")
    hosts = []
    for c, start in zip(caches, starts):
        if isinstance(c, HostKVCache):
            c._advance(start, n_new)
            hosts.append(c)
        else:
            c.begin_forward(start, n_new)
    if hosts:
        if any(c.ws is not hosts[0].ws for c in hosts):
            raise ValueError("the host caches of one batched call must share one KVWorkspace")
        hosts[0].ws.begin(hosts)


class GpuKV8Cache(_Ring):
    """All layers in lowvram.kernels.attention8's 8-bit format on the device (INT8 K smoothed by a mean
    fixed at the first write, INT8 V, per-token scales) for `attention="triton8"`: update quantizes the new
    chunk in place and returns the window as a KV8Cache view (read directly by the 8-bit kernel) and None."""

    def __init__(self, num_layers: int, capacity: int, batch: int, heads: int, head_dim: int, device="cuda"):
        from lowvram.kernels.attention8 import kv8_alloc

        self.layers = [kv8_alloc(batch, capacity, heads, head_dim, device) for _ in range(num_layers)]
        super().__init__(num_layers, capacity)

    def reset(self) -> None:
        """Empty the cache; the next first write fixes a new smoothing mean."""
        super().reset()
        for layer in getattr(self, "layers", []):
            layer.mean_ready = False

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
        from lowvram.kernels.attention8 import kv8_window, kv8_write

        kv8_write(self.layers[layer], self.off, k_new, v_new)
        return kv8_window(self.layers[layer], self.end), None

    def done(self, layer: int) -> None:
        pass
