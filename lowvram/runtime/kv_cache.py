"""Per-step KV ring caches: on the GPU, or in host memory streamed layer by layer.

The model calls, per forward and per layer:
    cache.begin_forward(start, n_new)      # n_new tokens written at ring offset start % capacity
    k_win, v_win = cache.update(layer, k_new, v_new)   # [B, end, H, D] views of the window
    cache.done(layer)                      # attention of this layer finished with the window
The window is [0, end) with end = start + n_new until the ring first wraps (an absolute start
>= capacity, or a cache already full), the whole cache after. The sink K/V are not in these caches.

`HostKVCache` keeps all layers in one host allocation (page-locked when possible) and works in
`n_slots` device windows shared by the step caches of a model (`KVWorkspace`). A copy stream
fetches layer l's window (all of it but the chunk the forward writes) ahead of use; after
`done(l)` a second stream writes the new chunk back (PCIe is full duplex) and the first fetches
layer l + n_slots into the freed slot.
With kv_dtype "int8" the host holds per-token-per-head absmax INT8 (fp32 scales), halving the
traffic; windows are dequantized to bf16 on the device after the copy.
"""

from __future__ import annotations

from enum import Enum

import torch

from lowvram.runtime.offload import ALIGN, CopyEngine, alloc_host

SCALE_BYTES = 4  # fp32 per-token-per-head scale of the INT8 cache


class KVFormat(str, Enum):
    """How a step cache (or the sink) stores K and V."""

    BF16 = "bf16"  # the compute dtype (GPU caches, host caches of bf16 profiles)
    INT8 = "int8"  # per-(token, head) absmax INT8 + fp32 scales (host caches; the INT8 sink)
    KV8 = "kv8"  # the 8-bit attention kernel's format on the GPU: INT8 K smoothed by a fixed mean, INT8 V

    def __str__(self) -> str:
        return self.value


def kv_token_bytes(heads: int, head_dim: int, kv_format: str) -> int:
    """K + V bytes of one token of one layer (kv8's per-cache K mean is negligible)."""
    if KVFormat(kv_format) in (KVFormat.INT8, KVFormat.KV8):
        return 2 * (heads * head_dim + heads * SCALE_BYTES)
    return 2 * heads * head_dim * 2


def kv_workspace_bytes(capacity: int, max_new: int, heads: int, head_dim: int, kv_dtype: str,
                       n_slots: int = 2, batch: int = 1) -> int:
    """Device bytes of a KVWorkspace: bf16 windows, and for INT8 the staging buffers and chunk temporaries."""
    hd = heads * head_dim
    total = n_slots * 2 * batch * capacity * hd * 2
    if KVFormat(kv_dtype) == KVFormat.INT8:
        total += batch * (capacity + max_new) * kv_token_bytes(heads, head_dim, "int8")
        total += 3 * batch * max_new * hd * 4  # fp32 temporaries of quantizing the new chunk
    return total


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., D] -> (int8 [..., D], fp32 scale [...]) with per-row absmax scaling."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
    q = torch.round(xf / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[...] = q * scale in out's dtype, with no full-size fp32 temporary."""
    return torch.mul(q, scale.unsqueeze(-1), out=out)


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
    """All layers' K and V on the device; update writes in place and returns views."""

    def __init__(self, num_layers: int, capacity: int, batch: int, heads: int, head_dim: int,
                 dtype=torch.bfloat16, device="cuda"):
        self.k = torch.empty(num_layers, batch, capacity, heads, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        super().__init__(num_layers, capacity)

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
        # k_new, v_new: [B, n_new, H, D] -> windows [B, end, H, D]
        a, b = self.off, self.off + self.n_new
        self.k[layer, :, a:b].copy_(k_new)
        self.v[layer, :, a:b].copy_(v_new)
        return self.k[layer, :, :self.end], self.v[layer, :, :self.end]

    def done(self, layer: int) -> None:
        pass


class KVWorkspace:
    """Device windows (and INT8 staging) shared by the host caches of one model; one forward at a time."""

    def __init__(self, capacity: int, batch: int, heads: int, head_dim: int, device, n_slots: int = 2,
                 int8: bool = False, max_new: int | None = None, copy_stream=None, engine: CopyEngine | None = None):
        self.engine = engine or CopyEngine(device, copy_stream)  # host -> device windows
        self.wb = CopyEngine(device)  # device -> host write-back, on its own stream
        dev = self.engine.device
        self.shape = (batch, capacity, heads, head_dim)
        self.n_slots, self.int8 = n_slots, int8
        self.max_new = max_new or capacity
        # window of slot s: kv[s, 0] = K, kv[s, 1] = V, each [B, capacity, H, D] bf16
        self.kv = torch.empty(n_slots, 2, *self.shape, dtype=torch.bfloat16, device=dev)
        if int8:
            self.stage_q = torch.empty(2, *self.shape, dtype=torch.int8, device=dev)
            self.stage_s = torch.empty(2, *self.shape[:3], dtype=torch.float32, device=dev)
            self.wb_q = torch.empty(2, batch, self.max_new, heads, head_dim, dtype=torch.int8, device=dev)
            self.wb_s = torch.empty(2, batch, self.max_new, heads, dtype=torch.float32, device=dev)
        self.loaded = [self.engine.event() for _ in range(n_slots)]  # window copy into slot s finished
        self.freed = [self.engine.event() for _ in range(n_slots)]  # attention reading slot s finished
        self.read = [self.engine.event() for _ in range(n_slots)]  # write-back reading slot s finished
        self.start = self.engine.event()
        self.wb_tail = self.engine.event()


class HostKVCache(_Ring):
    """All layers in host memory (one allocation); windows streamed through a KVWorkspace."""

    def __init__(self, num_layers: int, capacity: int, batch: int, heads: int, head_dim: int,
                 kv_dtype: str = "bf16", device="cuda", workspace: KVWorkspace | None = None, n_slots: int = 2,
                 pinned: bool = True, max_new: int | None = None):
        if kv_dtype not in ("bf16", "int8"):
            raise ValueError(f"kv_dtype must be bf16 or int8, not {kv_dtype!r}")
        self.int8 = kv_dtype == "int8"
        self.ws = workspace or KVWorkspace(capacity, batch, heads, head_dim, device, n_slots, self.int8, max_new)
        if self.ws.shape != (batch, capacity, heads, head_dim) or (self.int8 and not self.ws.int8):
            raise ValueError("the workspace was built for another cache shape or without INT8 staging")
        self.engine = self.ws.engine
        full = (num_layers, 2, batch, capacity, heads)
        n_q = num_layers * 2 * batch * capacity * heads * head_dim
        if self.int8:
            q_bytes = -(-n_q // ALIGN) * ALIGN
            raw, self.pinned = alloc_host(q_bytes + n_q // head_dim * 4, pinned and self.engine.cuda)
            self.host_q = raw[:n_q].view(torch.int8).view(*full, head_dim)  # [L, 2, B, cap, H, D]
            self.host_s = raw[q_bytes:].view(torch.float32).view(full)  # [L, 2, B, cap, H]
        else:
            raw, self.pinned = alloc_host(n_q * 2, pinned and self.engine.cuda)
            self.host = raw.view(torch.bfloat16).view(*full, head_dim)  # [L, 2, B, cap, H, D]
        self.nbytes = raw.numel()
        super().__init__(num_layers, capacity)

    def _ranges(self) -> list[tuple[int, int]]:
        """Token ranges of the window to fetch: all of [0, end) but the chunk this forward writes."""
        a, b = self.off, self.off + self.n_new
        return [(x, y) for x, y in ((0, a), (b, self.end)) if y > x]

    def begin_forward(self, start: int, n_new: int) -> None:
        super().begin_forward(start, n_new)
        if self.n_new > self.ws.max_new and self.int8:
            raise ValueError(f"n_new {n_new} exceeds the workspace's max_new {self.ws.max_new}")
        e = self.engine
        e.record_compute(self.ws.start)
        e.copy_waits(self.ws.start)  # orders: earlier forwards' reads of the shared slots before these prefetches
        self.ws.wb.record_copy(self.ws.wb_tail)
        e.copy_waits(self.ws.wb_tail)  # orders: earlier write-backs landed in host memory before windows are read
        for layer in range(min(self.ws.n_slots, self.num_layers)):
            self._prefetch(layer)

    def _prefetch(self, layer: int) -> None:
        e, ws, s = self.engine, self.ws, layer % self.ws.n_slots
        with e.copying():
            e.copy_waits(ws.freed[s])  # orders: the attention that last read slot s before overwriting it
            e.copy_waits(ws.read[s])  # orders: the write-back that last read slot s before overwriting it
            with e.timed():
                for x, y in self._ranges():
                    for kv in range(2):
                        for b in range(ws.shape[0]):
                            if self.int8:
                                ws.stage_q[kv, b, x:y].copy_(self.host_q[layer, kv, b, x:y], non_blocking=True)
                                ws.stage_s[kv, b, x:y].copy_(self.host_s[layer, kv, b, x:y], non_blocking=True)
                            else:
                                ws.kv[s, kv, b, x:y].copy_(self.host[layer, kv, b, x:y], non_blocking=True)
                    if self.int8:  # on the copy stream, right behind its copy
                        dequantize_kv(ws.stage_q[:, :, x:y], ws.stage_s[:, :, x:y], ws.kv[s, :, :, x:y])
            e.record_copy(ws.loaded[s])
        tok = sum(y - x for x, y in self._ranges())
        e.bytes_h2d += tok * ws.shape[0] * kv_token_bytes(ws.shape[2], ws.shape[3], "int8" if self.int8 else "bf16")

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
        # k_new, v_new: [B, n_new, H, D] -> windows [B, end, H, D] bf16 on the device
        ws, s = self.ws, layer % self.ws.n_slots
        self.engine.compute_waits(ws.loaded[s])  # orders: the window's copy (and dequantization) before use
        a, b = self.off, self.off + self.n_new
        ws.kv[s, 0, :, a:b].copy_(k_new)
        ws.kv[s, 1, :, a:b].copy_(v_new)
        return ws.kv[s, 0, :, :self.end], ws.kv[s, 1, :, :self.end]

    def done(self, layer: int) -> None:
        ws, s = self.ws, layer % self.ws.n_slots
        wb, a, n = ws.wb, self.off, self.n_new
        self.engine.record_compute(ws.freed[s])  # orders: the chunk write and the attention before write-back and refill
        with wb.copying():
            wb.copy_waits(ws.freed[s])
            with wb.timed():
                if self.int8:
                    q, sc = quantize_kv(ws.kv[s, :, :, a:a + n])
                    ws.wb_q[:, :, :n].copy_(q)
                    ws.wb_s[:, :, :n].copy_(sc)
                    wb.record_copy(ws.read[s])  # slot s may be refilled once its chunk is quantized
                for kv in range(2):
                    for b in range(ws.shape[0]):
                        if self.int8:
                            self.host_q[layer, kv, b, a:a + n].copy_(ws.wb_q[kv, b, :n], non_blocking=True)
                            self.host_s[layer, kv, b, a:a + n].copy_(ws.wb_s[kv, b, :n], non_blocking=True)
                        else:
                            self.host[layer, kv, b, a:a + n].copy_(ws.kv[s, kv, b, a:a + n], non_blocking=True)
                if not self.int8:
                    wb.record_copy(ws.read[s])
        wb.bytes_d2h += n * ws.shape[0] * kv_token_bytes(ws.shape[2], ws.shape[3], "int8" if self.int8 else "bf16")
        if layer + ws.n_slots < self.num_layers:
            self._prefetch(layer + ws.n_slots)

    def reset_stats(self) -> None:
        self.engine.reset_stats()
        self.ws.wb.reset_stats()

    def stats(self) -> dict:
        """Bytes each way and busy seconds of the two copy streams (shared by the workspace's caches)."""
        h2d, d2h = self.engine.stats(), self.ws.wb.stats()
        return {"bytes_h2d": h2d["bytes_h2d"], "bytes_d2h": d2h["bytes_d2h"], "copy_busy_s": h2d["copy_busy_s"],
                "writeback_busy_s": d2h["copy_busy_s"]}


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
