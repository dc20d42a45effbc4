"""Building blocks of the Wan2.1 VAE: causal 3-D convs with a time cache, RMS norm, resampling,
residual and attention blocks (brief §1.3).

Attribute names follow `Wan2.1_VAE.pth` (`residual.0.gamma`, `residual.2.weight`,
`resample.1.weight`, `time_conv.bias`, `to_qkv`, `proj`, ...), so its state dict loads as is.

Streaming works chunk by chunk in time. Every causal conv owns one slot of a `TimeCache` that
keeps the last `CACHE_T` time slices of the conv's input from the previous chunk; slots are
visited in call order, so one chunk's forward pass walks the slots from 0. The temporal
up-sampler's slot starts as `REP` (first chunk: no time conv at all, then zero history), and
the temporal down-sampler keeps its last input slice; both as in the reference.

Dtype: weights may be bf16. Norms compute in fp32 (like `F.normalize` under autocast) and
every conv casts its input to the weight dtype, so activations and caches stay in the weight
dtype between convs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CACHE_T = 2  # time slices each causal conv keeps from the previous chunk
REP = "Rep"  # marker: the temporal up-sampler has seen its first chunk, history counts as zeros


class TimeCache:
    """Per-conv time history, one slot per causal conv in call order."""

    def __init__(self) -> None:
        self.slots: list = []
        self.pos = 0

    def start_chunk(self) -> None:
        """Point at slot 0 before a chunk runs through the network."""
        self.pos = 0

    def peek(self):
        if self.pos == len(self.slots):
            self.slots.append(None)
        return self.slots[self.pos]

    def put(self, value) -> None:
        self.slots[self.pos] = value
        self.pos += 1

    def equals(self, other: "TimeCache") -> bool:
        """True when both caches hold bit-identical tensors (and the same markers)."""
        if len(self.slots) != len(other.slots):
            return False
        for a, b in zip(self.slots, other.slots):
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                if a.shape != b.shape or not torch.equal(a, b):
                    return False
            elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or a != b:
                return False
        return True

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.slots if isinstance(s, torch.Tensor))


def _history(x: torch.Tensor, prev) -> torch.Tensor:
    """The last CACHE_T time slices of x, topped up with the previous chunk's last slice."""
    # x: [B, C, T, H, W]
    if x.shape[2] > CACHE_T:
        new = x[:, :, -CACHE_T:].clone()  # clone: do not pin the whole chunk in memory
    else:
        new = x
    if new.shape[2] < CACHE_T and isinstance(prev, torch.Tensor):
        new = torch.cat([prev[:, :, -1:], new], dim=2)
    return new


class CausalConv3d(nn.Conv3d):
    """Conv3d padded symmetrically in space and by 2·p on the left only in time.

    `forward(x, history)` prepends the cached slices and pads only what they do not cover.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=0)
        pt, ph, pw = padding if isinstance(padding, tuple) else (padding,) * 3
        self.time_pad = 2 * pt
        self.space_pad = (pw, pw, ph, ph)

    def forward(self, x: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, C, T, H, W]; history: [B, C, <=CACHE_T, H, W]
        x = x.to(self.weight.dtype)
        left = self.time_pad
        if history is not None and left > 0:
            x = torch.cat([history.to(x), x], dim=2)
            left -= history.shape[2]
        x = F.pad(x, (*self.space_pad, left, 0))
        if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            # for thin chunks PyTorch's heuristic picks the slow im2col conv3d; oneDNN is ~5x faster
            return torch.mkldnn_convolution(x, self.weight, self.bias, (0, 0, 0), self.stride,
                                            self.dilation, self.groups)
        return super().forward(x)

    def cached(self, x: torch.Tensor, cache: TimeCache | None) -> torch.Tensor:
        """Run on one chunk, reading and updating this conv's slot of the cache."""
        if cache is None:
            return self(x)
        x = x.to(self.weight.dtype)
        prev = cache.peek()
        out = self(x, prev)
        cache.put(_history(x, prev))
        return out


class RMS_norm(nn.Module):
    """x / ||x||_C · sqrt(C) · gamma over the channel dim, computed in fp32."""

    def __init__(self, dim: int, images: bool = True) -> None:
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, (T,) H, W] -> same shape, fp32
        y = F.normalize(x.float(), dim=1)
        return y.mul_(self.scale).mul_(self.gamma)


def norm_silu(norm: RMS_norm, x: torch.Tensor) -> torch.Tensor:
    return F.silu(norm(x), inplace=True)


def frames_to_images(x: torch.Tensor) -> torch.Tensor:
    # x: [B, C, T, H, W] -> [B*T, C, H, W]
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def images_to_frames(x: torch.Tensor, t: int) -> torch.Tensor:
    # x: [B*T, C, H, W] -> [B, C, T, H, W]
    bt, c, h, w = x.shape
    return x.reshape(bt // t, t, c, h, w).transpose(1, 2)


class Upsample(nn.Module):
    """Nearest-exact 2x spatial upsampling.

    The reference upsamples in fp32 and casts back; nearest-neighbour copies values, so doing
    it in bf16 gives the same bits with half the memory (tested).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=(2.0, 2.0), mode="nearest-exact")


class Resample(nn.Module):
    """Spatial 2x up/down sampling, optionally with a temporal 2x through `time_conv`."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(Upsample(), nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def _time_up(self, x: torch.Tensor, cache: TimeCache | None) -> torch.Tensor:
        # x: [B, C, T, H, W] -> [B, C, 2T, H, W] (or unchanged on the first chunk)
        if cache is None:
            return x
        prev = cache.peek()
        if prev is None:  # first chunk: its frame is not doubled in time
            cache.put(REP)
            return x
        x = x.to(self.time_conv.weight.dtype)
        # after REP the history counts as zeros: the conv pads them itself
        y = self.time_conv(x, None if prev is REP else prev)
        cache.put(_history(x, None if prev is REP else prev))
        b, c, t, h, w = x.shape
        # y: [B, 2C, T, H, W], channel halves interleave in time -> [B, C, 2T, H, W]
        return y.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)

    def _time_down(self, x: torch.Tensor, cache: TimeCache | None) -> torch.Tensor:
        # x: [B, C, T, H, W] -> [B, C, T/2, H, W] (or unchanged on the first chunk)
        if cache is None:
            return x
        prev = cache.peek()
        if prev is None:  # first chunk: kept as history, not convolved
            cache.put(x)
            return x
        y = self.time_conv(torch.cat([prev[:, :, -1:].to(x), x], dim=2))
        cache.put(x[:, :, -1:].clone())
        return y

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        # x: [B, C, T, H, W]
        if self.mode == "upsample3d":
            x = self._time_up(x, cache)
        t = x.shape[2]
        conv = self.resample[1]
        x = images_to_frames(conv(self.resample[0](frames_to_images(x.to(conv.weight.dtype)))), t)
        if self.mode == "downsample3d":
            x = self._time_down(x, cache)
        return x


class ResidualBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1x1x1 shortcut when widths differ."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Identity(),  # Identity: dropout slot
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        # x: [B, C_in, T, H, W] -> [B, C_out, T, H, W]
        r = self.residual
        h = self.shortcut(x)
        y = r[2].cached(norm_silu(r[0], x), cache)
        y = r[6].cached(norm_silu(r[3], y), cache)
        return y + h.to(y.dtype)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMS_norm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, T, H, W]
        b, c, t, h, w = x.shape
        y = self.norm(frames_to_images(x)).to(self.to_qkv.weight.dtype)
        qkv = self.to_qkv(y).reshape(b * t, 1, 3 * c, h * w).transpose(-1, -2)
        q, k, v = qkv.contiguous().chunk(3, dim=-1)  # each [B*T, 1, H*W, C]
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        return images_to_frames(self.proj(y), t) + x.to(self.proj.weight.dtype)
