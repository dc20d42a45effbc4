"""The LiveAvatar S2V DiT at inference (docs/model.md §1.1, §3.3-§3.7): a sink prefill and a streaming
forward over one block of latent frames that writes and reads a per-step KV ring cache.

Attribute names equal the checkpoint keys (`blocks.N.self_attn.q`, `casual_audio_encoder`, ...),
so the real state dict loads with no remapping. All sizes come from `DiTConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowvram.kernels.kvquant import dequantize_heads, quantize_heads_int8
from lowvram.model.attention import attend_two_segments
from lowvram.model.audio import AudioInjector, CausalAudioEncoder
from lowvram.model.config import DiTConfig
from lowvram.model.framepack import FramePackMotioner
from lowvram.model.layers import Block, Head, linear_fp32, sinusoidal_embedding_1d
from lowvram.model.rope import RopeTable, grid_positions, rope_apply, sink_rope_tables
from lowvram.runtime.kv_cache import begin_forwards

SINK_REF_FRAME = 30  # the reference frame's RoPE time position in the sink pass


@dataclass
class Sink:
    """The shared sink: per layer un-roped K and raw V of the ref + motion tokens, their positions.

    Stored in the compute dtype, or (prefill_sink(int8=True)) as per-(token, head) absmax INT8 with fp32
    scales (half the memory; `layer(i)` dequantizes one layer at a time for its attention)."""

    k: list  # num_layers x [B, Ls, H, D], or x (int8 [B, Ls, H, D], fp32 scale [B, Ls, H])
    v: list
    pos: torch.Tensor  # [Ls, 3] on the host, with the ref tokens (the first n_ref) at frame 30
    n_ref: int
    dtype: torch.dtype | None = None  # the compute dtype of an INT8 sink's dequantized layers
    tables: tuple | None = None  # sink_rope_tables of `pos` (cos, sin [Ls, D/2] on the model's device), or None

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's (K, V) [B, Ls, H, D] in the compute dtype."""
        if self.dtype is None:
            return self.k[i], self.v[i]
        return tuple(dequantize_heads(q, s, out=torch.empty(q.shape, dtype=self.dtype, device=q.device))
                     for q, s in (self.k[i], self.v[i]))

    def nbytes(self) -> int:
        ts = [t for kv in (self.k, self.v) for x in kv for t in (x if isinstance(x, tuple) else (x,))]
        return sum(t.numel() * t.element_size() for t in ts)

    def ref_frame(self, start_frame: int, ref_shift: int) -> int:
        """The ref tokens' time position in a streaming call at latent frame n: 30 + max(0, n - 30 + d)."""
        return SINK_REF_FRAME + max(0, start_frame - SINK_REF_FRAME + ref_shift)

    def positions(self, start_frame: int, ref_shift: int) -> torch.Tensor:
        """Sink positions [Ls, 3] (on the host) for a streaming call at latent frame n."""
        pos = self.pos.clone()
        pos[: self.n_ref, 0] = self.ref_frame(start_frame, ref_shift)
        return pos

    def last_frame(self, start_frame: int, ref_shift: int) -> int:
        """The largest time position of positions(n, d) (the RoPE table must reach it), read on the host."""
        rest = self.pos[self.n_ref:, 0]
        return max([self.ref_frame(start_frame, ref_shift)] + ([int(rest.max())] if rest.numel() else []))

    def rope_tables(self, rope: RopeTable, start_frame: int, ref_shift: int) -> tuple[torch.Tensor, torch.Tensor]:
        """sink_rope_tables(rope, positions(n, d)), the same values, without copying positions to the device:
        `tables` (the prefill's, at frame 30) with the ref tokens' time pairs set from the table's row of
        ref_frame(n, d), a row of multipliers with no conjugate (>= 30). Without `tables` (a Sink built by hand),
        or on another device, they are gathered once (one copy of `pos`)."""
        if self.tables is None or self.tables[0].device != rope.cos.device:
            self.tables = sink_rope_tables(rope, self.pos)
        f, pt = self.ref_frame(start_frame, ref_shift), rope.pairs[0]
        cos, sin = (t.clone() for t in self.tables)
        cos[: self.n_ref, :pt] = rope.cos[f, :pt]
        sin[: self.n_ref, :pt] = rope.sin[f, :pt]
        return cos, sin


class LiveAvatarDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        dim, p = cfg.dim, cfg.patch_size
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=p, stride=p)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([Block(dim, cfg.ffn_dim, cfg.num_heads, cfg.eps) for _ in range(cfg.num_layers)])
        self.head = Head(dim, cfg.out_dim, p, cfg.eps)
        self.cond_encoder = nn.Conv3d(cfg.cond_dim, dim, kernel_size=p, stride=p)
        self.casual_audio_encoder = CausalAudioEncoder(cfg.audio_dim, dim, cfg.num_audio_layers, cfg.num_audio_token)
        self.audio_injector = AudioInjector(dim, cfg.num_heads, cfg.audio_inject_layers, cfg.eps)
        self.trainable_cond_mask = nn.Embedding(3, dim)
        self.frame_packer = FramePackMotioner(cfg.in_dim, dim)
        self.attention = "sdpa"
        self._rope: RopeTable | None = None

    # ----------------------------------------------------------------------------- helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def rope(self) -> RopeTable:
        dev = self.patch_embedding.weight.device
        if self._rope is None or self._rope.cos.device != dev:
            self._rope = RopeTable.build(self.cfg.head_dim, self.cfg.rope_max_len, device=dev)
        return self._rope

    def _rope_for(self, last_frame: int) -> RopeTable:
        """The table, grown (doubled) past the reference's 45000 positions for videos longer than ~2 h;
        entries below the old length are unchanged (each is computed on its own in float64)."""
        table = self.rope
        if last_frame >= table.max_len:
            n = table.max_len
            while last_frame >= n:
                n *= 2
            self._rope = table = RopeTable.build(self.cfg.head_dim, n, device=table.cos.device)
        return table

    def embed_text(self, contexts: list[torch.Tensor]) -> torch.Tensor:
        """T5 outputs cut to their real length [L_i, text_dim] -> zero-padded to text_len -> [B, text_len, dim]."""
        L = self.cfg.text_len
        padded = torch.stack([F.pad(u[:L], (0, 0, 0, L - min(u.shape[0], L))) for u in contexts])
        return self.text_embedding(padded.to(self.patch_embedding.weight.device, self.dtype))

    def _time(self, t: torch.Tensor):  # t: [B, F] -> e [B, F, C] fp32, e0 [B, F, 6, C] fp32
        e = sinusoidal_embedding_1d(self.cfg.freq_dim, t.flatten()).float()
        e = linear_fp32(self.time_embedding[2], F.silu(linear_fp32(self.time_embedding[0], e)))
        e0 = linear_fp32(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.cfg.dim))
        return e.unflatten(0, t.shape), e0.unflatten(0, t.shape)

    def _patchify(self, x):  # x: [B, C, F, h, w] -> tokens [B, F*h'*w', dim], grid (F, h', w')
        y = self.patch_embedding(x.to(self.dtype))
        return y.flatten(2).transpose(1, 2), tuple(y.shape[2:])

    def _unpatchify(self, x, grid):  # x: [B, L, p*q*r*c] -> [B, c, F*p, h'*q, w'*r]
        f, h, w = grid
        p, q, r = self.cfg.patch_size
        c = self.cfg.out_dim
        x = x.reshape(x.shape[0], f, h, w, p, q, r, c)
        return torch.einsum("bfhwpqrc->bcfphqwr", x).reshape(x.shape[0], c, f * p, h * q, w * r)

    # ----------------------------------------------------------------------------- sink
    @torch.no_grad()
    def prefill_sink(self, ref_latent, motion_latents, context, int8: bool = False) -> Sink:
        """The sink pass: ref tokens (mask id 1) + FramePack motion tokens (mask id 2) at t = 0,
        self-attention among themselves, text cross-attention, FFN; no audio, no head.

        ref_latent: [B, 16, 1, h, w]; motion_latents: [B, 16, T, h, w]; context: [B, text_len, dim].
        int8: keep each layer's K/V as per-(token, head) INT8 (the host step caches' format, kernels/rowquant.py)
        as soon as its attention is done, never holding the whole sink in the compute dtype."""
        b = ref_latent.shape[0]
        ref, (_, hh, ww) = self._patchify(ref_latent)                           # [B, h'w', C]
        mot = self.frame_packer(motion_latents.to(self.dtype))                  # [B, Lm, C]
        x = torch.cat([ref, mot], dim=1)
        ids = torch.cat([torch.ones(ref.shape[1], dtype=torch.long), torch.full((mot.shape[1],), 2)])
        x = x + self.trainable_cond_mask(ids.to(x.device)).to(x.dtype)
        h, w = ref_latent.shape[-2:]
        pos = torch.cat([grid_positions([SINK_REF_FRAME], range(hh), range(ww)),
                         FramePackMotioner.positions(h, w)])
        cos, sin = sink_rope_tables(self.rope, pos)  # q and k share the sink's positions
        # t = 0 for the sink; computed as the reference does (a block's frames plus the zero row, in one
        # batch), so the fp32 GEMMs see the same shapes and round alike
        _, e0 = self._time(torch.zeros(b + 1, 3, device=x.device))
        e0 = e0[-1:, :1].expand(b, -1, -1, -1)
        ks, vs = [], []
        for block in self.blocks:
            def attend(q, k, v):
                ks.append(quantize_heads_int8(k) if int8 else k)
                vs.append(quantize_heads_int8(v) if int8 else v)
                return attend_two_segments(rope_apply(q, cos, sin), None, None, k, v, cos, sin, self.attention)
            x = block(x, e0, context, attend, frames=1)
        return Sink(ks, vs, pos, n_ref=ref.shape[1], dtype=x.dtype if int8 else None, tables=(cos, sin))

    # ----------------------------------------------------------------------------- streaming
    @torch.no_grad()
    def forward(self, x, t, context, audio, kv, sink: Sink, start_frame, ref_shift):
        """One denoising step of one block, or (batched) of B blocks in one call.

        x: [B, 16, F, h, w] noisy latents; t: [B, F] timesteps; context: [1, text_len, dim] (shared by the
        batch); audio: [B, L, Da, 4F] wav2vec2 features of each block's video frames, or their AudioTokens
        (encode_audio; a block's steps can share them); kv: this step's ring
        cache (begin_forward/update/done), or a list of B caches, one per sample (distinct caches: the steps
        of one tick); sink: from prefill_sink, shared; start_frame: absolute latent index of the block's
        first frame, and ref_shift: the reference's rolling-sink shift d, each an int or B of them.
        Batched: the GEMMs run over all B x F*h'*w' tokens at once; per sample are the time embedding (the
        reference's [t; 0] shapes), the RoPE positions, the sink positions (its keys are roped per sample)
        and the attention over that sample's window and the sink. B = 1 is exactly the unbatched call.
        Returns the velocity [B, 16, F, h, w] in the compute dtype.
        The call is `prepare` (the host's part) then `run` (the device's); runtime/graphs.py replays `run` as a
        CUDA graph."""
        return self.run(x, t, context, audio, sink, self.prepare(x, t, audio, kv, sink, start_frame, ref_shift))

    @torch.no_grad()
    def prepare(self, x, t, audio, kv, sink: Sink, start_frame, ref_shift) -> "Call":
        """The host's part of a call (forward's arguments): checks the batch, advances the caches' rings
        (begin_forward, begin_forwards) and builds on the device the RoPE multipliers of the queries and of each
        sample's sink positions, the only tensors of a call that depend on its start frames and shifts."""
        cfg = self.cfg
        b = x.shape[0]
        kvs = list(kv) if isinstance(kv, (list, tuple)) else [kv]
        starts = [start_frame] * b if isinstance(start_frame, int) else [int(n) for n in start_frame]
        shifts = [ref_shift] * b if isinstance(ref_shift, int) else [int(d) for d in ref_shift]
        n_audio = audio.batch if isinstance(audio, AudioTokens) else audio.shape[0]
        if not len(kvs) == len(starts) == len(shifts) == b or t.shape[0] != b or n_audio != b:
            raise ValueError(f"a batch of {b} needs {b} timesteps rows, audios, caches, start frames and shifts")
        # the patch embedding's token grid (kernel = stride = patch: floor division, as the convolution)
        frames, rows, cols = (n // p for n, p in zip(x.shape[2:], cfg.patch_size))
        # positions on the host, multipliers built on the device from the table (no host-to-device copy: each
        # would synchronise the host with the GPU, tests/test_sync.py)
        rope = self._rope_for(max(max(n + frames for n in starts),
                                  max(sink.last_frame(n, d) for n, d in zip(starts, shifts))))
        # RoPE of each sample's tokens, stacked [B * F*h'*w', D/2] (the blocks rope q and k row by row)
        cs = [rope.grid(n, frames, rows, cols) for n in starts]
        cos, sin = (cs[0][0], cs[0][1]) if b == 1 else (torch.cat([c for c, _ in cs]), torch.cat([s for _, s in cs]))
        # the sink's, per sample, the same in all layers of the call
        sinks = [sink.rope_tables(rope, n, d) for n, d in zip(starts, shifts)]
        n_new, per_frame = frames * rows * cols, rows * cols
        if b == 1:
            kvs[0].begin_forward(starts[0] * per_frame, n_new)
        else:
            begin_forwards(kvs, [n * per_frame for n in starts], n_new)
        return Call(kvs, cos, sin, sinks)

    @torch.no_grad()
    def encode_audio(self, audio: torch.Tensor) -> "AudioTokens":
        """The injectors' audio tokens of B blocks from their wav2vec2 features [B, L, Da, 4F]: the causal audio
        encoder over the block's frames behind its first frame repeated motion_frames times, the motion frames'
        outputs cut, in the compute dtype. They depend on the block's audio only, so a block's steps can share
        them (Engine.audio_tokens encodes each block once, not once per step)."""
        cfg = self.cfg
        pre = audio[..., :1].expand(*audio.shape[:-1], cfg.motion_frames)
        feats = torch.cat([pre, audio], dim=-1)
        # the convolutions (audio encoder, patch embedding) run per sample: oneDNN's and cuDNN's kernels depend
        # on the batch size, per-sample calls keep each sample's bits those of its unbatched forward (< 0.1% of
        # the FLOPs; tests/test_batched.py)
        a_glob, a_loc = _per_sample(self.casual_audio_encoder, feats)
        skip = (cfg.motion_frames + 3) // 4
        return AudioTokens(a_glob[:, skip:].to(self.dtype), a_loc[:, skip:].to(self.dtype))

    @torch.no_grad()
    def run(self, x, t, context, audio, sink: Sink, call: "Call"):
        """The device's part of a call: `forward`'s arguments with `prepare`'s Call, whose caches have begun it.
        Its host code depends on the shapes, the caches and the sink only, so a CUDA graph of it replays any call of
        those shapes whose tensors were copied into the captured ones (runtime/graphs.py)."""
        dt = self.dtype
        b, kvs, sinks = x.shape[0], call.kvs, call.sinks
        a_glob, a_loc = audio if isinstance(audio, AudioTokens) else self.encode_audio(audio)
        # the patch embedding runs per sample, as the audio encoder (encode_audio says why)
        tokens, grid = _per_sample(self._patchify, x)
        frames = grid[0]
        # no pose video: cond_encoder(0) is exactly its bias
        tokens = tokens + self.cond_encoder.bias.to(dt) + self.trainable_cond_mask.weight[0].to(dt)
        t = t.to(tokens.device, torch.float32)
        # per sample + the zero-t row, as the reference embeds one block's t (the fp32 GEMMs keep its shapes)
        es = [self._time(torch.cat([t[j:j + 1], torch.zeros_like(t[:1])])) for j in range(b)]
        e = es[0][0][:1] if b == 1 else torch.cat([e[:1] for e, _ in es])
        e0 = es[0][1][:1] if b == 1 else torch.cat([e0[:1] for _, e0 in es])
        h = tokens
        for i, block in enumerate(self.blocks):
            def attend(q, k, v, i=i):  # q, k: [B, L, H, D] roped by the block (with their norms)
                k_sink, v_sink = sink.layer(i)
                outs = []
                for j, c in enumerate(kvs):  # each sample over its own window (its own length) and the sink
                    k_win, v_win = c.update(i, k[j:j + 1], v[j:j + 1])
                    join = partial(c.joined, i) if hasattr(c, "joined") else None  # the sink behind the window
                    room = partial(c.room, i) if hasattr(c, "room") else None  # where its roped keys go
                    outs.append(attend_two_segments(q[j:j + 1], k_win, v_win, k_sink, v_sink, *sinks[j],
                                                    self.attention, join, room))
                    c.done(i)
                return outs[0] if b == 1 else outs  # the o projection reads the list (SelfAttention.forward)
            h = block(h, e0, context, attend, frames, rope=(call.cos, call.sin))
            h = self.audio_injector(i, h, a_loc, a_glob)
        out = self.head(h, e, frames)
        return self._unpatchify(out, grid)


class AudioTokens(NamedTuple):
    """B blocks' audio as the audio injectors read it (LiveAvatarDiT.encode_audio), in the compute dtype."""

    glob: torch.Tensor  # [B, F, 1, C]: one global token per latent frame
    loc: torch.Tensor  # [B, F, n + 1, C]: the local tokens and the learned padding token

    @property
    def batch(self) -> int:
        return self.glob.shape[0]

    @classmethod
    def cat(cls, parts: list["AudioTokens"]) -> "AudioTokens":
        """The tokens of several blocks as one batch, in order."""
        if len(parts) == 1:
            return parts[0]
        return cls(torch.cat([p.glob for p in parts]), torch.cat([p.loc for p in parts]))


@dataclass
class Call:
    """What LiveAvatarDiT.prepare decides on the host for one call and `run` reads."""

    kvs: list  # one begun step cache per sample (update/joined/done)
    cos: torch.Tensor  # the queries' RoPE multipliers, [F*h'*w', D/2] or stacked per sample [B*F*h'*w', D/2]
    sin: torch.Tensor
    sinks: list  # per sample, the sink's (cos, sin) [Ls, D/2] at that sample's positions


def _per_sample(fn, x):
    """fn(x) of a batch computed one sample at a time: fn returns a tensor or a tuple whose tensors have the
    batch first (other members, e.g. a grid, are taken from the first sample)."""
    if x.shape[0] == 1:
        return fn(x)
    outs = [fn(x[j:j + 1]) for j in range(x.shape[0])]
    if isinstance(outs[0], torch.Tensor):
        return torch.cat(outs)
    return tuple(torch.cat(parts) if isinstance(parts[0], torch.Tensor) else parts[0] for parts in zip(*outs))


def build_model(cfg: DiTConfig, device="meta", dtype=torch.bfloat16) -> LiveAvatarDiT:
    """An uninitialised model (on the meta device by default, for load_state_dict(assign=True))."""
    with torch.device(device):
        model = LiveAvatarDiT(cfg)
    return model.to(dtype) if device != "meta" else model
