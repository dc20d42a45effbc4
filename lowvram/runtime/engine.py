"""`Engine.build(model, plan, device)`: the only code that applies a plan, and the denoising loop it drives.

Applying a plan: the attention backend on the model instance, the GEMM backend on every QuantLinear,
resident blocks on the device and the others streamed from host slabs (with the audio injector that
runs after them), each step's KV cache on the device (with the plan's room for the sink behind its windows)
or in host memory in the plan's format (host caches share one ring of device windows sized for the plan's
batch), the sink in the plan's dtype, the OOM guard that moves one more block to streaming and retries, and
(plan.cuda_graphs, on CUDA) the steady calls replayed as CUDA graphs (runtime/graphs.py).

Per video (`start`): the text embedding, the sink prefill, the sampler's sigmas, the seeded noise per
clip; the rolling-sink shift of each (block, step) comes from the seed (schedule.ref_shift). Per tick of
the timestep-forcing schedule (`run_works`): with plan.batch > 1 the tick's forwards (distinct steps of
distinct blocks) run as one batched DiT call, so streamed blocks cross PCIe once per call; else one
forward each (`step`). A block's audio tokens are encoded at its first step and reused by the others
(`audio_tokens`). `denoise_block` runs one block's steps in turn; `decode` runs the streaming VAE.
The pipeline, the benchmarks and the tests all drive this object.
"""

from __future__ import annotations

import torch

from lowvram.constants import FRAMES_PER_BLOCK, KV_FRAMES, LATENT_FRAMES
from lowvram.model.dit import AudioTokens
from lowvram.runtime.kv_cache import GpuKV8Cache, GpuKVCache, HostKVCache, KVFormat, KVWorkspace, slots_for
from lowvram.runtime.planner import workspace_sink_tokens
from lowvram.runtime.offload import BlockStreamer, apply_block_streaming, retry_on_oom
from lowvram.runtime.plan import Plan
from lowvram.runtime.schedule import BlockIndex, Work, euler_step, flow_sigmas, model_timesteps, ref_shift


def injector_units(model) -> dict:
    """block index -> the audio-injector modules that run right after it."""
    inj = model.audio_injector
    return {blk: [inj.injector[k], inj.injector_adain_layers[k]] for blk, k in inj.block_to_injector.items()}


def place_model(model, plan: Plan, device: torch.device) -> BlockStreamer | None:
    """Move the model (loaded on the CPU, or already on `device`) as the plan says; the streamer if any block streams."""
    units = injector_units(model)
    attached = {m for ms in units.values() for m in ms}
    for name, child in model.named_children():
        if name not in ("blocks", "audio_injector"):
            child.to(device)
    for m in model.audio_injector.modules():
        if m not in attached and next(m.parameters(recurse=False), None) is not None:
            m.to(device)
    if plan.streamed:
        return apply_block_streaming(model.blocks, plan, device, attached=units)
    model.blocks.to(device)
    for ms in units.values():
        for m in ms:
            m.to(device)
    return None


def make_kv_caches(model, plan: Plan, device: torch.device, tokens_per_frame: int) -> list:
    """One ring cache per held step (plan.steps), placed and stored as the plan says (GPU caches with the plan's
    room for the sink behind their windows; host caches share one device workspace of plan.kv_slots windows)."""
    cfg = model.cfg
    cap = KV_FRAMES * tokens_per_frame
    shape = (cfg.num_layers, cap, 1, cfg.num_heads, cfg.head_dim)
    caches, ws = [], None
    for i, where in enumerate(plan.kv_caches):
        if where == "gpu":
            if plan.kv_format == KVFormat.KV8:
                caches.append(GpuKV8Cache(*shape, device))
            else:
                caches.append(GpuKVCache(*shape, model.dtype, device, sink=plan.gpu_kv_sink))
            continue
        if ws is None:  # plan.kv_slots windows: the plan's batch of one layer and one more (kv_cache.slots_for)
            ws = KVWorkspace(cap, 1, cfg.num_heads, cfg.head_dim, device, plan.kv_slots or slots_for(plan.batch),
                             plan.kv_format, max_new=FRAMES_PER_BLOCK * tokens_per_frame,
                             sink=workspace_sink_tokens(plan))
        caches.append(HostKVCache(*shape, plan.kv_format, device, workspace=ws, pinned=i < plan.pinned_kv_caches))
    return caches


class Engine:
    """A DiT placed by a plan, with its step caches, sink and streaming VAE decoder."""

    def __init__(self, model, plan: Plan, device: torch.device, streamer, kv: list, vae=None, log=print):
        self.model, self.plan, self.device, self.streamer, self.kv, self.vae = model, plan, device, streamer, kv, vae
        self.cache = dict(zip(plan.steps, kv))  # denoising step -> its ring cache
        self.log = log
        self.sink = self.context = self.decoder = self.noise = None
        self.audio = {}  # BlockIndex -> its AudioTokens, from its first step on this engine to its last (audio_tokens)
        self.audio_encodes = 0  # blocks encoded (the tests count them)
        self.graphs = None  # ForwardGraphs where the plan takes CUDA graphs (every call goes through it)
        if plan.cuda_graphs and device.type == "cuda":
            from lowvram.runtime.graphs import ForwardGraphs

            self.graphs = ForwardGraphs(model, log=log)

    @classmethod
    def build(cls, model, plan: Plan, device, vae=None, log=print) -> "Engine":
        """Apply `plan` to `model` on `device` (the model's GEMM and attention backends, placement, caches)."""
        from lowvram.quantize.linear import set_gemm_backend

        device = torch.device(device)
        model.attention = plan.attention
        set_gemm_backend(model, plan.gemm)
        streamer = place_model(model, plan, device)
        tokens = plan.tokens["per_frame"]
        return cls(model, plan, device, streamer, make_kv_caches(model, plan, device, tokens), vae, log)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # ------------------------------------------------------------------ per video
    def start(self, context: torch.Tensor, ref: torch.Tensor, motion: torch.Tensor, steps: int, seed: int,
              decoder=None) -> None:
        """A new video: empty caches, text embedding, sink prefill, sampler, seeds; the decoder (the plan's
        `vae_decode` unless one is given) warmed with the first 7 motion latents (as the reference's VAE rank).
        context: [L, text_dim] umT5 output."""
        if self.graphs is not None:
            self.graphs.release()  # it holds the last video's sink and context
        for c in self.kv:
            c.reset()
        self.audio = {}
        self.context = self.model.embed_text([context])
        self.sigmas = flow_sigmas(steps)
        self.t = model_timesteps(self.sigmas)
        # the last of this engine's steps that a block runs (a run of fewer steps than the plan holds ends earlier)
        self.last_step = max((i for i in self.plan.steps if i < len(self.t)), default=len(self.t) - 1)
        self.seed = seed
        self.h, self.w = ref.shape[-2:]
        self.noise = None
        self.refresh_sink(ref, motion)
        if decoder is None and self.vae is not None:
            from lowvram.runtime.decode import make_decoder

            decoder = make_decoder(self.plan.profile.vae_decode, self.vae, self.device)
        self.decoder = decoder
        if decoder is not None:
            decoder.decode(motion[:, :, :7].to(self.device, self.vae.dtype))

    def refresh_sink(self, ref: torch.Tensor, motion: torch.Tensor) -> None:
        """(Re)build the sink from ref [1,16,1,h,w] and motion [1,16,T,h,w]; the old one is freed first (with a
        graph, which holds it)."""
        if self.graphs is not None:
            self.graphs.release()
        self.sink = None
        self.sink = self.model.prefill_sink(ref.to(self.device, self.dtype), motion.to(self.device, self.dtype),
                                            self.context, int8=self.plan.sink_dtype == "int8")

    def initial_latents(self, idx: BlockIndex) -> torch.Tensor:
        """The block's noise [1, 16, 3, h, w]: a slice of its clip's noise, drawn from seed + clip (bf16 on the
        device, as the reference)."""
        if self.noise is None or self.noise[0] != idx.clip:
            g = torch.Generator(device=self.device).manual_seed(self.seed + idx.clip)
            self.noise = (idx.clip, torch.randn(16, LATENT_FRAMES, self.h, self.w, dtype=self.dtype,
                                                device=self.device, generator=g))
        f0 = idx.block * FRAMES_PER_BLOCK
        return self.noise[1][None, :, f0:f0 + FRAMES_PER_BLOCK]

    def step(self, idx: BlockIndex, i: int, x: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """Denoising step i of block idx: one DiT forward against step cache i, then the Euler update. audio: the
        block's features [1, L+1, D, 12] (on the host or the device), encoded once per block (audio_tokens)."""
        t = torch.full((1, FRAMES_PER_BLOCK), float(self.t[i]), dtype=torch.float32, device=self.device)
        d = ref_shift(self.seed, idx, i)
        v = self.guarded(lambda: self.forward(x, t, self.audio_tokens(idx, audio), self.cache[i], idx.start_frame, d))
        self.done_with(idx, i)
        return euler_step(x, v, self.sigmas[i], self.sigmas[i + 1])

    def audio_tokens(self, idx: BlockIndex, features: torch.Tensor):
        """Block idx's AudioTokens (LiveAvatarDiT.encode_audio of its features, moved to the device first): encoded
        at the block's first step on this engine and kept until its last (done_with), since they depend on the
        block's audio only; every step's call reads the same tokens as when each call encoded them."""
        tok = self.audio.get(idx)
        if tok is None:
            tok = self.audio[idx] = self.model.encode_audio(self.to_device(features))
            self.audio_encodes += 1
        return tok

    def done_with(self, idx: BlockIndex, i: int) -> None:
        """Step i of block idx ran: after this engine's last held step the block's audio tokens go."""
        if i >= self.last_step:
            self.audio.pop(idx, None)

    def run_works(self, works: list[Work], xs: list[torch.Tensor], audios: list[torch.Tensor]) -> list[torch.Tensor]:
        """The forwards of one tick (schedule.ticks) on this engine's step caches: xs[k] [1, 16, 3, h, w] after
        step works[k].step of block works[k].idx, with that block's audio [1, L+1, D, 12]. With plan.batch > 1
        up to plan.batch works run as one DiT call (their steps must be distinct: a call writes each step cache
        once); else one forward each, in order. The same values either way (each sample's arithmetic is its own)."""
        batch = max(self.plan.batch, 1)
        out = []
        for k in range(0, len(works), batch):
            ws, x, a = works[k:k + batch], xs[k:k + batch], audios[k:k + batch]
            if len(ws) == 1:
                out.append(self.step(ws[0].idx, ws[0].step, x[0], a[0]))
            else:
                out += self._batched(ws, x, a)
        return out

    def _batched(self, works: list[Work], xs: list[torch.Tensor], audios: list[torch.Tensor]) -> list[torch.Tensor]:
        """One DiT call over len(works) forwards, then each sample's Euler update (as `step`)."""
        x = torch.cat(xs)  # [B, 16, 3, h, w]
        t = torch.stack([torch.full((FRAMES_PER_BLOCK,), float(self.t[w.step]), dtype=torch.float32,
                                    device=self.device) for w in works])  # [B, 3]
        caches = [self.cache[w.step] for w in works]
        starts = [w.idx.start_frame for w in works]
        shifts = [ref_shift(self.seed, w.idx, w.step) for w in works]
        v = self.guarded(lambda: self.forward(
            x, t, AudioTokens.cat([self.audio_tokens(w.idx, a) for w, a in zip(works, audios)]), caches, starts, shifts))
        for w in works:
            self.done_with(w.idx, w.step)
        return [euler_step(xk, v[k:k + 1], self.sigmas[w.step], self.sigmas[w.step + 1])
                for k, (w, xk) in enumerate(zip(works, xs))]

    def forward(self, x, t, audio, kv, starts, shifts) -> torch.Tensor:
        """One DiT call (LiveAvatarDiT.forward's arguments but the video's context and sink), through the CUDA
        graphs where the plan takes them."""
        return (self.graphs or self.model)(x, t, self.context, audio, kv, self.sink, starts, shifts)

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """t (a block's audio features, on the host) on the engine's device. To a GPU through page-locked memory
        with non_blocking: a blocking copy makes torch synchronise the stream after it, emptying the queue of a
        launch-bound forward (tests/test_sync.py). The page-locked block is torch's caching host allocator's,
        kept from reuse until the copy is done (it records an event on this stream)."""
        if self.device.type != "cuda" or t.device.type != "cpu":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def denoise_block(self, idx: BlockIndex, audio: torch.Tensor) -> torch.Tensor:
        """`steps` Euler steps of one block; audio: its 12 feature frames [1, L+1, D, 12]. Returns the clean
        latents [1, 16, 3, h, w]."""
        x = self.initial_latents(idx)
        for i in range(len(self.t)):
            x = self.step(idx, i, x, audio)
        return x

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[1, 16, 3, h, w] -> frames [3, 12, H, W] in [-1, 1]."""
        return self.decoder.decode(latents.to(self.vae.dtype))[0]

    def decode_queue(self, to_uint8: bool = False):
        """The started decoder behind a queue (runtime.decode.OverlappedDecoder): `submit(latents)` of finished
        blocks in order, frames back in that order; on its own CUDA stream beside the DiT when the plan says so
        (plan.vae_overlap: the planner then holds both activations), else synchronous."""
        from lowvram.runtime.decode import OverlappedDecoder

        return OverlappedDecoder(self.decoder, to_uint8=to_uint8, overlap=self.plan.vae_overlap)

    # ------------------------------------------------------------------ the OOM guard, statistics, teardown
    def guarded(self, forward):
        """Run forward(); on CUDA OOM stream one more block and retry (a LowvramError when none is left)."""
        if self.streamer is None:
            return forward()
        return retry_on_oom(forward, self.streamer, self.log)

    def stats(self) -> dict:
        out = {}
        if self.streamer is not None:
            out["blocks"] = self.streamer.stats()
        hosts = [c for c in self.kv if isinstance(c, HostKVCache)]
        if hosts:
            out["kv"] = hosts[0].stats()
        if self.graphs is not None:
            out["graphs"] = self.graphs.stats()
        return out

    def reset_stats(self) -> None:
        if self.streamer is not None:
            self.streamer.reset_stats()
        hosts = [c for c in self.kv if isinstance(c, HostKVCache)]
        if hosts:
            hosts[0].reset_stats()

    def release(self) -> None:
        """Free what the engine holds on the device (caches, sink, buffers); the model is not usable after."""
        if self.streamer is not None:
            self.streamer.remove()
        self.graphs = None
        self.kv, self.cache, self.sink, self.context, self.decoder, self.noise = [], {}, None, None, None, None
        self.streamer = None
