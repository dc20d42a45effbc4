"""The Wan2.1 VAE (docs/model.md §7): causal 3-D encoder/decoder with a time feature cache.

- `WanVAE.encode(video)` runs frame 0 alone, then chunks of 4 frames, and returns the
  normalised mean latent; `WanVAE.decode(z)` runs one latent frame at a time.
- `StreamingDecoder` keeps the decoder cache across calls, so a latent sequence decoded in
  pieces gives exactly the frames of the whole decode. `DecodeOptions` switch on faster ways to
  run the same maths (channels-last convs, the fused norm kernel, several latents per step);
  the default options are the reference's arithmetic bit for bit.
- `encode_repeated` encodes one image repeated n times (the reference's motion latents) and
  stops as soon as the encoder reaches a bit-identical steady state.
- `load_vae` reads `Wan2.1_VAE.pth` (built on meta, assigned, no second copy);
  `lowvram.demo.components.write_tiny_vae` writes a small random checkpoint of the same layout.

Module names equal the checkpoint's keys: encoder.*, conv1.*, conv2.*, decoder.*.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lowvram.errors import CheckpointError, LowvramError
from lowvram.model.vae_blocks import AttentionBlock, CausalConv3d, Resample, ResidualBlock, RMS_norm, TimeCache

# per-channel statistics of Wan2.1 latents: z = (mu - MEAN) / STD
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class VAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)

    @property
    def time_stride(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def space_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


class Encoder3d(nn.Module):
    """Video [B, 3, T, H, W] -> [B, 2·z, T', H/8, W/8] (mu ‖ log-variance before `conv1`)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(c_in, c_out))
                c_in = c_out
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(c_out, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        c = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c))
        self.head = nn.Sequential(RMS_norm(c, images=False), nn.SiLU(),
                                  CausalConv3d(c, 2 * cfg.z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        # x: [B, 3, T, H, W]
        x = self.conv1.cached(x, cache)
        for block in self.downsamples:
            x = block(x, cache)
        x = self.middle[0](x, cache)
        x = self.middle[1](x)
        x = self.middle[2](x, cache)
        return self.head[2].cached(x, cache, norm=self.head[0])


class Decoder3d(nn.Module):
    """Latent [B, z, T, h, w] -> video [B, 3, T·4 (1 for the very first frame), 8h, 8w]."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * m for m in (mult[-1], *mult[::-1])]
        time_up = cfg.temperal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        blocks: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                c_in //= 2  # the up-sampler's conv halves the width
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(c_in, c_out))
                c_in = c_out
            if i != len(mult) - 1:
                blocks.append(Resample(c_out, "upsample3d" if time_up[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMS_norm(dims[-1], images=False), nn.SiLU(),
                                  CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        # x: [B, C0, T, h, w]
        x = self.conv1.cached(x, cache)
        x = self.middle[0](x, cache)
        x = self.middle[1](x)
        x = self.middle[2](x, cache)
        for block in self.upsamples:
            x = block(x, cache)
        return self.head[2].cached(x, cache, norm=self.head[0])


class WanVAE(nn.Module):
    """The Wan2.1 video VAE. Inputs and outputs are float tensors in [-1, 1]."""

    def __init__(self, cfg: VAEConfig = VAEConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def latent_stats(self, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) as [1, z, 1, 1, 1] in the model dtype, as the reference holds them."""
        if self.cfg.z_dim != len(LATENT_MEAN):
            raise LowvramError(f"the Wan2.1 latent statistics have {len(LATENT_MEAN)} channels, "
                               f"this VAE has z_dim {self.cfg.z_dim}; use a z_dim-16 checkpoint")
        kw = dict(dtype=self.dtype, device=self.device)  # the latents are moved to the model's device
        mean = torch.tensor(LATENT_MEAN, **kw).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(LATENT_STD, **kw).view(1, -1, 1, 1, 1)
        return mean, inv_std

    def check_video(self, video: torch.Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise LowvramError(f"VAE encode expects a video [B, 3, T, H, W], got {list(video.shape)}")
        t, h, w = video.shape[2:]
        s, ts = self.cfg.space_stride, self.cfg.time_stride
        if (t - 1) % ts or h % s or w % s:
            raise LowvramError(f"VAE encode needs T = 1 + {ts}k frames and H, W multiples of {s}; "
                               f"got T={t}, H={h}, W={w}: trim or pad the video")

    def encode_chunks(self, video: torch.Tensor, cache: TimeCache):
        """Yield the encoder output of frame 0, then of each following chunk of 4 frames.

        The video may stay on the CPU: each chunk moves to the model's device on its own.
        """
        # video: [B, 3, T, H, W] -> yields [B, 2z, 1, H/8, W/8]
        ts = self.cfg.time_stride
        starts = [0] + list(range(1, video.shape[2], ts))
        for i, s in enumerate(starts):
            cache.start_chunk()
            yield self.encoder(video[:, :, s:s + (1 if i == 0 else ts)].to(self.device), cache)

    def finish_encode(self, enc: torch.Tensor) -> torch.Tensor:
        """Encoder output [B, 2z, T', h, w] -> normalised mean latent, float32."""
        mu = self.conv1(enc)[:, : self.cfg.z_dim]
        mean, inv_std = self.latent_stats(mu)
        return ((mu - mean) * inv_std).float()

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, 1+4k, H, W] in [-1, 1] -> normalised latent mu [B, z, 1+k, H/8, W/8]."""
        self.check_video(video)
        cache = TimeCache()
        return self.finish_encode(torch.cat(list(self.encode_chunks(video, cache)), dim=2))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latent [B, z, n, h, w] -> video [B, 3, 1+4(n-1), 8h, 8w], float in [-1, 1]."""
        dec = StreamingDecoder(self)
        return dec.decode(z)


@dataclass(frozen=True)
class DecodeOptions:
    """How `StreamingDecoder` runs the decoder: the same maths, faster roundings.

    The defaults are the reference's arithmetic bit for bit (cuDNN's NCDHW convs, the banded
    eager norm, one latent per step). Each switch keeps the maths and changes where it rounds;
    tests/test_vae.py bounds each against the default path.
    - channels_last: decoder weights and conv buffers in NDHWC (cuDNN's Hopper conv kernels).
    - fused_norm: RMS norm + SiLU in one Triton kernel (kernels/vae_norm.py) on CUDA;
      norm_backend "triton" forces it (Triton's interpreter on the CPU), "torch" its twin.
    - split_time: each 3x3x3 conv as three 2-D convs over shifted frames, summed.
    - out_align: > 0 computes each 3x3x3 conv's output channels rounded up to a multiple of it (zero
      weights, cut off as a view), for cuDNN's wider tiles (the 96-channel convs at full size).
    - subpixel: each spatial up-sampling and its 3x3 conv as one conv on the low-resolution frames and a
      pixel shuffle (vae_blocks.Resample), never writing the 4x larger up-sampled frames.
    - group: latent frames per decoder step (the first latent of a video always runs alone).
    - cudnn_benchmark: let cuDNN time its algorithms for each conv shape (first call slower).
    """

    channels_last: bool = False
    fused_norm: bool = False
    norm_backend: str = "auto"
    split_time: bool = False
    subpixel: bool = False
    out_align: int = 0
    group: int = 1
    cudnn_benchmark: bool = False

    def __post_init__(self) -> None:
        if self.group < 1:
            raise LowvramError(f"DecodeOptions.group must be >= 1 latent frames, got {self.group}")
        if self.norm_backend not in ("auto", "triton", "torch"):
            raise LowvramError(f"DecodeOptions.norm_backend must be auto, triton or torch, not {self.norm_backend!r}")

    @classmethod
    def lean(cls, group: int = 1) -> "DecodeOptions":
        """fast() without the 128-wide conv outputs (and, in make_decoder, without CUDA graphs): less memory."""
        return cls(channels_last=True, fused_norm=True, subpixel=True, group=group)

    @classmethod
    def fast(cls, group: int = 1) -> "DecodeOptions":
        """Channels-last convs, the fused norm (with the convs' biases), the sub-pixel up-sampling and 3x3x3 conv
        outputs computed 128 channels wide (bounded against the exact path, not bit-equal; H200,
        tools/bench_vae.py, with CUDA graphs: 76 ms a 12-frame block at 704x384 against 179 exact, 38.6 dB)."""
        return cls(channels_last=True, fused_norm=True, subpixel=True, out_align=128, group=group)


def configure_decoder(vae: WanVAE, opts: DecodeOptions) -> None:
    """Set the decoder's per-module switches and weight layout for `opts` (cheap when unchanged).

    Only the decoder changes: the encoder and `conv1`/`conv2` keep their layout and arithmetic.
    """
    conv_fmt = torch.channels_last_3d if opts.channels_last else torch.contiguous_format
    img_fmt = torch.channels_last if opts.channels_last else torch.contiguous_format
    for m in vae.decoder.modules():
        if isinstance(m, RMS_norm):
            m.fused = opts.norm_backend if opts.fused_norm else None
        if isinstance(m, Resample):
            m.subpixel = opts.subpixel
        if isinstance(m, CausalConv3d):
            if m.memory_format != conv_fmt or m.split_time != opts.split_time:
                m._weights_2d = None
            m.memory_format, m.split_time, m.out_align = conv_fmt, opts.split_time, opts.out_align
        if isinstance(m, (nn.Conv3d, nn.Conv2d)):
            fmt = conv_fmt if isinstance(m, nn.Conv3d) else img_fmt
            if not m.weight.is_contiguous(memory_format=fmt):
                m.weight.data = m.weight.data.contiguous(memory_format=fmt)


class StreamingDecoder:
    """Decodes a latent sequence piece by piece, `opts.group` latent frames per step (default 1).

    The decoder's time cache persists across `decode` calls until `reset`; the first call after
    a reset yields 1 + 4(n-1) frames, later calls 4n. With group 1 pieces give exactly the frames
    of a whole decode; with more, pieces cut at other latents than the whole decode's steps give
    the same maths at other batch shapes (cuDNN may round differently).
    """

    def __init__(self, vae: WanVAE, opts: DecodeOptions = DecodeOptions()) -> None:
        self.vae = vae
        self.opts = opts
        self.cache = self._new_cache()
        self._stats = None

    def _new_cache(self) -> TimeCache:
        return TimeCache()

    def reset(self) -> None:
        """Forget the history: the next latent is decoded as the first of a new video."""
        self.cache = self._new_cache()

    def state_tensors(self) -> list[torch.Tensor]:
        """The tensors the decoder carries from one call to the next (its time cache)."""
        return [s for s in self.cache.slots if isinstance(s, torch.Tensor)]

    def _latent_stats(self):
        # held on the device: a fresh host->device copy per call would make the CPU wait for the stream
        vae = self.vae
        if self._stats is None or self._stats[0].device != vae.device or self._stats[0].dtype != vae.dtype:
            self._stats = vae.latent_stats(None)
        return self._stats

    def _step(self, z: torch.Tensor) -> torch.Tensor:
        """One decoder step: de-normalised latents [B, z_dim, g, h, w] -> frames [B, 3, F, 8h, 8w] fp32."""
        self.cache.start_chunk()
        x = self.vae.conv2(z)  # per step, so any split into the same steps gives the same bits
        y = self.vae.decoder(x, self.cache)
        return y.to(torch.float32, memory_format=torch.contiguous_format).clamp_(-1, 1)

    def _run(self, z: torch.Tensor) -> torch.Tensor:
        return self._step(z)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, z_dim, n, h, w] normalised latents -> frames [B, 3, F, 8h, 8w] float32."""
        vae = self.vae
        if z.ndim != 5 or z.shape[1] != vae.cfg.z_dim:
            raise LowvramError(f"VAE decode expects latents [B, {vae.cfg.z_dim}, n, h, w], "
                               f"got {list(z.shape)}")
        configure_decoder(vae, self.opts)
        mean, inv_std = self._latent_stats()
        z = z.to(device=vae.device, dtype=vae.dtype) / inv_std + mean
        bench = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.opts.cudnn_benchmark or bench
        try:
            frames, i = [], 0
            while i < z.shape[2]:
                # a fresh cache: the first latent runs alone (the temporal up-samplers' first chunk)
                g = 1 if not self.cache.slots else min(self.opts.group, z.shape[2] - i)
                frames.append(self._run(z[:, :, i:i + g]))
                i += g
        finally:
            torch.backends.cudnn.benchmark = bench
        return frames[0] if len(frames) == 1 else torch.cat(frames, dim=2)


@torch.no_grad()
def encode_repeated(vae: WanVAE, frame: torch.Tensor, n_frames: int) -> torch.Tensor:
    """Latents of `frame` repeated `n_frames` times, equal to `vae.encode(frame.repeat(...))`.

    frame: [B, 3, 1, H, W]; n_frames = 1 + 4k. Chunks are encoded until the encoder output
    and the whole time cache are bit-identical to the previous chunk's: from then on every
    chunk gives the same output, which is repeated instead of recomputed.
    Returns [B, z, 1+k, H/8, W/8] float32.
    """
    if frame.ndim != 5 or frame.shape[2] != 1:
        raise LowvramError(f"encode_repeated expects one frame [B, 3, 1, H, W], got {list(frame.shape)}")
    ts = vae.cfg.time_stride
    if n_frames < 1 or (n_frames - 1) % ts:
        raise LowvramError(f"encode_repeated needs n_frames = 1 + {ts}k, got {n_frames}")
    vae.check_video(frame)
    n_chunks = 1 + (n_frames - 1) // ts
    frame = frame.to(vae.device)
    chunk = frame.expand(-1, -1, ts, -1, -1).contiguous()
    cache = TimeCache()
    cache.start_chunk()
    outs = [vae.encoder(frame, cache)]
    prev_slots = None
    while len(outs) < n_chunks:
        cache.start_chunk()
        outs.append(vae.encoder(chunk, cache))
        steady = (prev_slots is not None and len(outs) >= 3 and torch.equal(outs[-1], outs[-2])
                  and TimeCache.equals(cache, prev_slots))
        if steady:
            outs.extend([outs[-1]] * (n_chunks - len(outs)))
            break
        prev_slots = _snapshot(cache)
    return vae.finish_encode(torch.cat(outs, dim=2))


def _snapshot(cache: TimeCache) -> TimeCache:
    # slots are replaced, never written in place, so a shallow copy is a true snapshot
    snap = TimeCache()
    snap.slots = list(cache.slots)
    return snap


# ---------------------------------------------------------------- checkpoint I/O


def config_from_state_dict(sd: dict, source: str) -> VAEConfig:
    """Base width and latent channels from the shapes of the state dict."""
    for key in ("encoder.conv1.weight", "conv2.weight"):
        if key not in sd or not isinstance(sd[key], torch.Tensor) or sd[key].ndim != 5:
            raise CheckpointError(f"{source}: no 5-D tensor {key!r}; this is not a Wan2.1 VAE "
                                  "checkpoint (expected Wan2.1_VAE.pth)")
    return VAEConfig(dim=sd["encoder.conv1.weight"].shape[0], z_dim=sd["conv2.weight"].shape[0])


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
        if "mmap" not in str(e):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"VAE checkpoint {path} does not exist; pass the path of Wan2.1_VAE.pth")
    try:
        sd = _torch_load(path)
    except Exception as e:  # any unreadable file becomes a one-line user error
        raise CheckpointError(f"cannot read VAE checkpoint {path}: {_first_line(e)}; "
                              "re-download Wan2.1_VAE.pth") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"VAE checkpoint {path} holds a {type(sd).__name__}, not a state dict "
                              "of tensors; pass Wan2.1_VAE.pth")
    return sd


def _check_keys(model: nn.Module, sd: dict, source: str) -> None:
    expected = dict(model.state_dict())
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) ({', '.join(unexpected[:3])}"
                         f"{', ...' if len(unexpected) > 3 else ''})")
        raise CheckpointError(f"VAE checkpoint {source} does not match the Wan2.1 VAE: "
                              f"{'; '.join(parts)}; pass Wan2.1_VAE.pth")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"VAE checkpoint {source}: {k} has shape {list(sd[k].shape)}, "
                                  f"expected {list(v.shape)}; the file is not a Wan2.1 VAE")


def load_vae(path, device="cpu", dtype: torch.dtype = torch.bfloat16) -> WanVAE:
    """Load `Wan2.1_VAE.pth` (or a tiny file of its layout) as an eval-mode `WanVAE`.

    The model is built on the meta device and the (memory-mapped) tensors are assigned, so no
    second copy exists; they are then moved/cast to `device`/`dtype` (bf16 as in LiveAvatar).
    """
    path = Path(path)
    sd = _read_state_dict(path)
    cfg = config_from_state_dict(sd, str(path))
    with torch.device("meta"):
        model = WanVAE(cfg)
    _check_keys(model, sd, str(path))
    model.load_state_dict(sd, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
