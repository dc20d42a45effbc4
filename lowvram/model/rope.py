"""3-D rotary position embedding of the S2V DiT (docs/model.md §4.2).

The head dim D splits into (time, height, width) pairs of D/2 - 2*(D/2 // 3), D/2 // 3, D/2 // 3
(22/21/21 pairs = 44/42/42 channels for D = 128). Pairs are interleaved (x[2i], x[2i+1]).
The reference builds a complex128 table of `max_len` positions, rounds the gathered multipliers
to fp16 (complex32), and rotates in float64. We keep the fp16-rounded table as (cos, sin) and
rotate bf16/fp16 inputs in float32: a bf16 value (8-bit mantissa) times an fp16 value (11-bit)
is exact in float32, and the one rounding of the sum then equals the reference's float64
result rounded to float32, so the output is bit-identical (tests/test_rope.py checks it).
float32 inputs rotate in float64, as the reference does. The rotation (`rope_apply`) lives with the
kernels' torch references (lowvram.kernels.reference), which the kernels must not import the model for.
A negative time position p means the conjugate multiplier of |p| (motion frames, docs/model.md §4.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lowvram.kernels.reference import rope_apply  # noqa: F401  (the model's RoPE; the kernels' torch twin)


def rope_pairs(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs of the head dim given to (time, height, width)."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def rope_params(max_len: int, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """polar(1, outer(arange(max_len), theta^(-arange(0, dim, 2)/dim))) in complex128: [max_len, dim/2]."""
    inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)
    return torch.polar(torch.ones_like(ang), ang)


@dataclass
class RopeTable:
    """fp16-rounded multipliers, cos and sin: [max_len, D/2] each, columns ordered (t | h | w)."""

    cos: torch.Tensor
    sin: torch.Tensor
    pairs: tuple[int, int, int]

    @classmethod
    def build(cls, head_dim: int, max_len: int = 45000, device="cpu") -> "RopeTable":
        pt, ph, pw = rope_pairs(head_dim)
        table = torch.cat([rope_params(max_len, 2 * pt), rope_params(max_len, 2 * ph),
                           rope_params(max_len, 2 * pw)], dim=1)  # [max_len, D/2] complex128
        return cls(table.real.to(torch.float16).to(device), table.imag.to(torch.float16).to(device),
                   (pt, ph, pw))

    @property
    def max_len(self) -> int:
        return self.cos.shape[0]

    def to(self, device) -> "RopeTable":
        return RopeTable(self.cos.to(device), self.sin.to(device), self.pairs)

    def gather(self, pos: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token multipliers for positions pos [L, 3] (f, h, w): (cos, sin) [L, D/2] in `dtype`.
        Positions on the CPU are checked against the table's length; positions already on a device are
        trusted (checking them would synchronise the device)."""
        pt, ph, _ = self.pairs
        if pos.device.type == "cpu" and pos.numel() and int(pos.abs().max()) >= self.max_len:  # no device sync
            raise ValueError(f"RoPE position {int(pos.abs().max())} is past the table of {self.max_len}")
        pos = pos.to(self.cos.device).long()
        # axis of every pair column: 0 for the first pt, 1 for the next ph, 2 for the rest
        axis = torch.zeros(self.cos.shape[1], dtype=torch.long, device=pos.device)
        axis[pt:pt + ph] = 1
        axis[pt + ph:] = 2
        p = pos[:, axis]  # [L, D/2]
        col = torch.arange(self.cos.shape[1], device=pos.device).expand_as(p)
        cos = self.cos[p.abs(), col].to(dtype)
        sin = self.sin[p.abs(), col].to(dtype) * torch.where(p < 0, -1.0, 1.0).to(dtype)
        return cos, sin

    def grid(self, start: int, frames: int, rows: int, cols: int,
             dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """gather(grid_positions(range(start, start + frames), range(rows), range(cols)), dtype), the same values,
        from slices of the table: no positions are built on the host and copied to the device (a copy that
        synchronises the host with the GPU every forward). start >= 0 (no conjugates)."""
        pt, ph, _ = self.pairs
        if start < 0 or start + frames > self.max_len or max(rows, cols) > self.max_len:
            raise ValueError(f"RoPE grid of frames [{start}, {start + frames}) x {rows} x {cols} is outside the "
                             f"table of {self.max_len}")
        shape = (frames, rows, cols, -1)

        def one(tab):  # [max_len, D/2] -> [F*R*C, D/2]: the time pairs by frame, height by row, width by column
            t = tab[start:start + frames, :pt][:, None, None].expand(shape)
            h = tab[:rows, pt:pt + ph][None, :, None].expand(shape)
            w = tab[:cols, pt + ph:][None, None].expand(shape)
            return torch.cat([t, h, w], dim=-1).reshape(-1, tab.shape[1]).to(dtype)

        return one(self.cos), one(self.sin)


def sink_rope_tables(rope: RopeTable, sink_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sink's multipliers as the attention kernels take them (sink_cos, sink_sin [Ls, D/2], contiguous, on
    the table's device): the fp16 table values at sink_pos [Ls, 3], sin negated for negative time positions.
    The sink positions are the same in every layer: gather once per forward."""
    cos, sin = rope.gather(sink_pos, dtype=rope.cos.dtype)
    return cos.contiguous(), sin.contiguous()


def grid_positions(frames, rows, cols) -> torch.Tensor:
    """Positions [F*R*C, 3] (f, h, w) of a token grid flattened in (f, h, w) order."""
    f = torch.as_tensor(list(frames), dtype=torch.long)
    h = torch.as_tensor(list(rows), dtype=torch.long)
    w = torch.as_tensor(list(cols), dtype=torch.long)
    ff, hh, ww = torch.meshgrid(f, h, w, indexing="ij")
    return torch.stack([ff, hh, ww], dim=-1).reshape(-1, 3)


def strided(size: int, k: int) -> list[int]:
    """The reference's sampled rows/cols: np.linspace(0, size-1, k).astype(int) (44 -> 0, 2, ..., 40, 43)."""
    return np.linspace(0, size - 1, k).astype(int).tolist()
