"""Building blocks of the Wan2.1 VAE: causal 3-D convs with a time cache, RMS norm, resampling,
residual and attention blocks (docs/model.md §7).

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

Speed switches (per module, set by `lowvram.model.vae.configure_decoder`; all off by default,
which is the reference's arithmetic bit for bit): `CausalConv3d.memory_format` (channels-last
buffers, so cuDNN runs its NDHWC kernels), `CausalConv3d.split_time` (a 3-frame conv as three
2-D convs summed), `RMS_norm.fused` (norm + SiLU in one Triton kernel, kernels/vae_norm.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CACHE_T = 2  # time slices each causal conv keeps from the previous chunk
BAND_ELEMENTS = 1 << 23  # elements of fp32 scratch per step of the frame-wise norm
PADDED_HISTORY = True  # channels-last batch-1 convs keep their history padded (CausalConv3d.padded_input)
REP = "Rep"  # marker: the temporal up-sampler has seen its first chunk, history counts as zeros


class TimeCache:
    """Per-conv time history, one slot per causal conv in call order.

    static: history of an unchanged shape is copied into the slot's tensor instead of replacing
    it, so the slots keep their addresses from chunk to chunk (what a CUDA graph replay needs).
    """

    def __init__(self, static: bool = False) -> None:
        self.slots: list = []
        self.pos = 0
        self.static = static

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

    def put_history(self, tail: torch.Tensor, memory_format=torch.contiguous_format) -> None:
        """Keep `tail` (a view into this chunk's conv input) as the slot's new history."""
        old = self.slots[self.pos] if self.pos < len(self.slots) else None
        if (self.static and isinstance(old, torch.Tensor) and old.shape == tail.shape
                and old.dtype == tail.dtype):
            old.copy_(tail)
            self.pos += 1
        else:
            self.put(tail.clone(memory_format=memory_format))

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


class CausalConv3d(nn.Conv3d):
    """Conv3d padded symmetrically in space and by 2·p on the left only in time.

    The input is assembled once, in the weight dtype, in a padded buffer: zero frames, then the
    cached slices of earlier chunks (`history`), then the chunk itself, optionally passed
    through RMS norm + SiLU frame by frame on the way in (so no full-size fp32 copy exists).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=0)
        pt, ph, pw = padding if isinstance(padding, tuple) else (padding,) * 3
        self.time_pad = 2 * pt
        self.space_pad = (ph, pw)
        self.memory_format = torch.contiguous_format  # of the padded buffers and kept history
        self.split_time = False  # run a 3-frame kernel as three 2-D convs (see conv_split_time)
        self._weights_2d = None
        self.out_align = 0  # > 0: compute the output channels rounded up to a multiple of this (see conv_padded)
        self._padded_w = None

    def conv_split_time(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """The conv as kt 2-D convs over shifted frame windows, summed in the weight dtype.

        Same maths as the 3-D conv; each partial sum is rounded before the adds, so not the
        same bits. With channels-last buffers and batch 1 the frame windows are views.
        """
        # x: [B, C, kt - 1 + T, H', W'] padded -> [B, O, T, H, W]
        kt = self.kernel_size[0]
        t = x.shape[2] - kt + 1
        w0 = self._weights_2d[0] if self._weights_2d is not None else None
        if w0 is None or w0.dtype != self.weight.dtype or w0.device != self.weight.device:
            fmt = torch.channels_last if self.memory_format == torch.channels_last_3d else torch.contiguous_format
            self._weights_2d = [self.weight[:, :, k].contiguous(memory_format=fmt) for k in range(kt)]
        out = None
        for k in range(kt):
            y = F.conv2d(frames_to_images(x[:, :, k:k + t]), self._weights_2d[k], self.bias if k == 0 and bias else None,
                         self.stride[1:])
            out = y if out is None else out.add_(y)
        return images_to_frames(out, t)

    def conv_padded(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """The bare convolution of an already padded input; bias=False leaves the bias to the consumer (the
        fused norm or bias_residual_ add it in their pass)."""
        if self.split_time and self.kernel_size[0] > 1 and self.stride[0] == 1:
            return self.conv_split_time(x, bias)
        b = self.bias if bias else None
        if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            # for thin chunks PyTorch's heuristic picks the slow im2col conv3d; oneDNN is ~5x faster
            return torch.mkldnn_convolution(x, self.weight, b, (0, 0, 0), self.stride,
                                            self.dilation, self.groups)
        o = self.out_channels
        if self.out_align and o % self.out_align and self.kernel_size[0] > 1:
            # zero output channels up to the alignment: cuDNN picks a wider (faster) tile for them; the extra
            # channels are cut off as a view (the consumers take any strides)
            w, wb = self.weight, self.bias
            key = (w.data_ptr(), w.dtype, w._version, wb.data_ptr(), wb._version, self.out_align)
            if self._padded_w is None or self._padded_w[0] != key:
                pad = -o % self.out_align
                fmt = self.memory_format if w.is_contiguous(memory_format=self.memory_format) else \
                    torch.contiguous_format
                self._padded_w = (key, torch.cat([w, w.new_zeros(pad, *w.shape[1:])]).contiguous(memory_format=fmt),
                                  torch.cat([wb, wb.new_zeros(pad)]))
            return F.conv3d(x, self._padded_w[1], self._padded_w[2] if bias else None, self.stride, self.padding,
                            self.dilation, self.groups)[:, :o]
        return F.conv3d(x, self.weight, b, self.stride, self.padding, self.dilation, self.groups)

    def padded_input(self, x: torch.Tensor, history: torch.Tensor | None = None,
                     norm: "RMS_norm | None" = None, bias: torch.Tensor | None = None):
        """The padded conv input for one chunk after `history`, and the new history.

        x: [B, C, T, H, W]; history: [B, C, <=CACHE_T, H, W] (conv inputs, already normed); bias: the
        producing conv's bias, not yet added to x (added by the norm).
        Returns (buf [B, C, 2 + T, H + 2ph, W + 2pw], the new history: a view of buf's last CACHE_T slices).
        With channels-last buffers of batch 1 each padded slice is one contiguous block of memory, so the
        history is kept padded (its zero borders included: [B, C, <=CACHE_T, H + 2ph, W + 2pw]) and both its
        copies (into the cache, back into the next buffer) are plain block copies rather than strided ones;
        otherwise it is the unpadded slices. The buffers hold the same values either way.
        """
        b, c, t, h, w = x.shape
        ph, pw = self.space_pad
        hp, wp = h + 2 * ph, w + 2 * pw
        nh = 0 if history is None else history.shape[2]
        zt = self.time_pad - nh  # time slices that stay zero
        buf = torch.empty((b, c, zt + nh + t, hp, wp), dtype=self.weight.dtype,
                          device=x.device, memory_format=self.memory_format)
        padded = PADDED_HISTORY and b == 1 and self.memory_format == torch.channels_last_3d
        filled = zt + nh if nh and history.shape[-2:] == (hp, wp) else zt  # slices written whole
        buf[:, :, :zt].zero_()
        if filled > zt:
            buf[:, :, zt:filled].copy_(history)
        if ph:
            buf[:, :, filled:, :ph].zero_()
            buf[:, :, filled:, -ph:].zero_()
        if pw:
            buf[:, :, filled:, :, :pw].zero_()
            buf[:, :, filled:, :, -pw:].zero_()
        inner = buf[:, :, zt:, ph:ph + h, pw:pw + w]  # [B, C, nh + T, H, W]
        if nh and filled == zt:
            inner[:, :, :nh].copy_(history)
        if norm is None:
            inner[:, :, nh:].copy_(x if bias is None else x + bias.view(-1, 1, 1, 1))
        else:
            norm.silu_into(x, inner[:, :, nh:], bias)
        if padded:
            return buf, buf[:, :, max(zt, buf.shape[2] - CACHE_T):]
        return buf, inner[:, :, -CACHE_T:]

    def forward(self, x: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, C, T, H, W]
        if self.time_pad == 0 and self.space_pad == (0, 0):
            return self.conv_padded(x.to(self.weight.dtype))  # 1x1x1 / strided time convs: no padding
        return self.conv_padded(self.padded_input(x, history)[0])

    def cached_input(self, x: torch.Tensor, cache: TimeCache | None,
                     norm: "RMS_norm | None" = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The padded input of one chunk (after bias and norm + SiLU if given); updates this conv's slot."""
        prev = cache.peek() if cache is not None else None
        buf, tail = self.padded_input(x, prev, norm, bias)
        if cache is not None:
            cache.put_history(tail, self.memory_format)
        return buf

    def cached(self, x: torch.Tensor, cache: TimeCache | None,
               norm: "RMS_norm | None" = None) -> torch.Tensor:
        """Run on one chunk (after norm + SiLU if given), reading and updating this conv's slot."""
        return self.conv_padded(self.cached_input(x, cache, norm))


class RMS_norm(nn.Module):
    """x / ||x||_C · sqrt(C) · gamma over the channel dim, computed in fp32."""

    def __init__(self, dim: int, images: bool = True) -> None:
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))
        self.fused = None  # None: the banded eager norm; "auto"/"triton"/"torch": kernels/vae_norm.py

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, (T,) H, W] -> same shape, fp32
        y = F.normalize(x.float(), dim=1)
        return y.mul_(self.scale).mul_(self.gamma)

    def silu_into(self, x: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """out[:] = SiLU(self(x)) cast to out's dtype, a band of rows of one frame at a time.

        Same arithmetic as F.normalize (x / max(||x||, eps)) and `forward` (on the GPU the same
        bits; on CPU a vector loop's scalar tail may round an element 1 ulp apart). bias: C elements added
        to x first (the fused kernel in fp32; the eager path as torch adds a conv's bias, in x's dtype).
        """
        # x, out: [B, C, T, H, W]
        if self.fused is not None:
            from lowvram.kernels.vae_norm import norm_silu_into

            norm_silu_into(x, self.gamma, self.scale, out, backend=self.fused, bias=bias)
            return
        if bias is not None:
            x = x + bias.view(-1, 1, 1, 1)
        if x.device.type == "cpu":  # same math, 5x faster there than vector_norm's strided reduction
            denom = x.float().square().sum(1, keepdim=True).sqrt_()
        else:  # the bits of F.normalize under autocast
            denom = torch.linalg.vector_norm(x, 2, dim=1, keepdim=True, dtype=torch.float32)
        denom = denom.clamp_min_(1e-12)
        b, c, t, h, w = x.shape
        rows = max(1, min(h, BAND_ELEMENTS // max(1, b * c * w)))  # fp32 work stays ~32 MB
        for i in range(t):
            for r in range(0, h, rows):
                band = (slice(None), slice(None), slice(i, i + 1), slice(r, r + rows))
                y = x[band].float() / denom[band]
                y.mul_(self.scale).mul_(self.gamma)
                out[band].copy_(F.silu(y, inplace=True))


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


def subpixel_weight(w: torch.Tensor) -> torch.Tensor:
    """The 3x3 conv after a nearest 2x upsampling as one 3x3 conv on the low-resolution input.

    w: [O, C, 3, 3] -> [4·O, C, 3, 3], output channel o·4 + 2a + b giving the pixels (2i + a, 2j + b)
    (F.pixel_shuffle's order). Upsampled row 2i + a + u (u = -1, 0, 1) is input row i + floor((a + u) / 2):
    for a = 0 the taps u = 0, 1 both read row i, for a = 1 the taps u = -1, 0; so each phase is a 2x2
    kernel whose taps are sums of the original ones. Summed in fp32 (or w's wider dtype), cast to w's dtype once.
    """
    acc = torch.promote_types(w.dtype, torch.float32)
    # m[a][offset, u]: tap u of the original kernel lands on input offset (-1, 0, +1) for phase a
    m = w.new_zeros(2, 3, 3, dtype=acc)
    m[0, 0, 0] = m[0, 1, 1] = m[0, 1, 2] = 1
    m[1, 1, 0] = m[1, 1, 1] = m[1, 2, 2] = 1
    w4 = torch.einsum("apu,ocuv,bqv->oabcpq", m, w.to(acc), m)  # [O, 2, 2, C, 3, 3]
    return w4.reshape(4 * w.shape[0], *w.shape[1:]).to(w.dtype)


class Resample(nn.Module):
    """Spatial 2x up/down sampling, optionally with a temporal 2x through `time_conv`.

    `subpixel` (up-sampling only, set by configure_decoder): the nearest up-sampling and its 3x3 conv as
    one 3x3 conv with 4x the output channels on the low-resolution frames, then a pixel shuffle
    (`subpixel_weight`): the 4x larger up-sampled input is never written. The same maths; the summed
    taps round once to the weight dtype, so not the same bits.
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.subpixel = False
        self._w4 = None
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
        # after REP the history counts as zeros: the conv pads them itself
        conv = self.time_conv
        buf, tail = conv.padded_input(x, None if prev is REP else prev)
        cache.put_history(tail, conv.memory_format)
        y = conv.conv_padded(buf)
        b, c, t, h, w = x.shape
        # y: [B, 2C, T, H, W], channel halves interleave in time: out[:, :, 2t + j] = y[:, j·C:(j+1)·C, t]
        out = torch.empty((b, c, 2 * t, h, w), dtype=y.dtype, device=y.device, memory_format=conv.memory_format)
        out.unflatten(2, (t, 2)).copy_(y.unflatten(1, (2, c)).permute(0, 2, 3, 1, 4, 5))
        return out

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

    def _spatial(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial resample of all frames as one batch of images.

        (One frame at a time would save ~0.1 GiB at 704x384, but cuDNN then picks other bf16
        kernels and the frames drift from the reference's bits; measured on an H200.)
        """
        # x: [B, C, T, H, W] -> [B, C', T, H', W']
        conv = self.resample[1]
        if self.subpixel and self.mode in ("upsample2d", "upsample3d"):
            return images_to_frames(self._subpixel(frames_to_images(x.to(conv.weight.dtype)), conv), x.shape[2])
        return images_to_frames(conv(self.resample[0](frames_to_images(x.to(conv.weight.dtype)))), x.shape[2])

    def _subpixel(self, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        # x: [N, C, H, W] -> [N, O, 2H, 2W], in x's memory format
        w = conv.weight
        key = (w.data_ptr(), w.dtype, w.device, w._version)
        if self._w4 is None or self._w4[0] != key:  # rebuilt when the weights move, change or change layout
            fmt = torch.channels_last if w.is_contiguous(memory_format=torch.channels_last) and w.shape[1] > 1 \
                else torch.contiguous_format
            self._w4 = (key, subpixel_weight(w).contiguous(memory_format=fmt))
        y = F.conv2d(x, self._w4[1], None, padding=1)  # [N, 4·O, H, W]
        n, o4, h, wd = y.shape
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1 \
            else torch.contiguous_format
        out = torch.empty((n, o4 // 4, 2 * h, 2 * wd), dtype=y.dtype, device=y.device, memory_format=fmt)
        # out[n, o, 2i + a, 2j + b] = y[n, 4o + 2a + b, i, j] + bias[o]: the shuffle adds the bias in its pass
        torch.add(y.view(n, o4 // 4, 2, 2, h, wd).permute(0, 1, 4, 2, 5, 3), conv.bias.view(1, -1, 1, 1, 1, 1),
                  out=out.view(n, o4 // 4, h, 2, wd, 2))
        return out

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        # x: [B, C, T, H, W]
        if self.mode == "upsample3d":
            x = self._time_up(x, cache)
        x = self._spatial(x)
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
        if r[3].fused is not None:  # the convs' biases in the fused passes: the norm's, bias + shortcut in one
            from lowvram.kernels.vae_norm import bias_residual_

            y = r[2].conv_padded(r[2].cached_input(x, cache, norm=r[0]), bias=False)
            buf = r[6].cached_input(y, cache, norm=r[3], bias=r[2].bias)
            del y
            return bias_residual_(r[6].conv_padded(buf, bias=False), r[6].bias, h, backend=r[3].fused)
        y = r[2].cached(x, cache, norm=r[0])
        buf = r[6].cached_input(y, cache, norm=r[3])
        del y  # its normed copy is in buf: free it before the conv allocates its output
        return r[6].conv_padded(buf).add_(h)


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
