"""The residency planner: from a profile, the DiT's sizes and a resolution, decide what lives where.

`make_plan` picks the DiT blocks that stay resident (the rest stream from host memory through
`n_buffers` GPU slabs), places the step KV caches in their format, counts the bytes that cross PCIe
per forward and adds up the expected peak VRAM. Tensor sizes come from the model built on the meta
device (`dit_tensor_bytes`) or, when a checkpoint is given, from its files (`Sizes`, filled by
`lowvram.runtime.plan`); the constants below are what cannot be read off a file: measured
activation and allocator terms, to calibrate against the benchmark's measured peak.

Peak = the larger of two phases:
- encode: umT5 (per the profile's t5 mode) or wav2vec2, before the DiT is placed;
- generate: resident DiT weights + streamed-block buffers + KV (GPU caches, or the working
  buffers of host caches) + sink K/V + VAE decoder and its time cache + one DiT forward's activations
  and one latent frame's VAE decode activations (their sum when the decode overlaps the DiT, else the larger),
plus the CUDA context and allocator slack.
For sdpa, bf16 KV buffers on the device hold the sink behind each window so attention reads [window; sink]
without a torch.cat: always in a host-cache workspace (its few slots, a small cost), in GPU caches only where
that room keeps every resident block resident (`_with_gpu_sink_room`; the plan's gpu_kv_sink).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping, Sequence

from lowvram.constants import ALIGN, FRAMES_PER_BLOCK, GIB, KV_FRAMES, NUM_STEPS
from lowvram.errors import LowvramError
from lowvram.model.attention import JOINED, Attention
from lowvram.model.config import DiTConfig, token_grid
from lowvram.runtime.kv_cache import KVFormat, kv8_mean_bytes, kv_token_bytes, kv_workspace_bytes, slots_for
from lowvram.runtime.offload import stream_order
from lowvram.runtime.plan import Plan, PlanItem
from lowvram.runtime.profile import Profile

T5_BYTES_PER_PARAM = {"bf16": 2.0, "int8": 1.0 + 4 / 4096, "nf4": 0.5 + 4 / 64, "cpu": 0.0}  # blocks; embedding bf16
# Wan2.1 VAE decoder (docs/model.md §7) time cache: 2 frames of the input of every causal conv: 4240 channels at
# 1/8 resolution, 2496 at 1/4, 1152 at 1/2, 672 at full size (per output pixel, bf16), for the released width (96).
VAE_REAL_DIM = 96
VAE_CACHE_BYTES_PER_PIXEL = 2 * 2 * (4240 / 64 + 2496 / 16 + 1152 / 4 + 672)
# One latent frame's decode (4 frames out), per output pixel: measured 1.17 GiB at 704x384 (H200, bf16,
# lowvram.model.vae at 601ec55; the cache formula above matched to the byte). Both scale with the width.
# fast: tools/bench_vae.py on the H200 (2026-12-02, DecodeOptions.fast() with CUDA graphs, as make_decoder builds
# it on a GPU) reserved 2.61 GiB beyond the time cache against 2.10 GiB for the exact path (x 1.24: the graphs'
# pools and the 128-channel conv outputs; without graphs or the wide outputs it was 0.97 GiB); tiny (TAEHV, its
# own 45 MB state): 0.22 GiB at 704x384. The graphs' pools stay reserved between decodes, so beside a DiT call
# they add to its activations rather than share them; the batched profiles' DiT activations are larger (their
# measured NVML peaks, tools/bench.py, are the check). Channels-last convs keep their history with its zero
# borders (vae_blocks.PADDED_HISTORY): 1.21 against 1.19 GiB of time cache at 704x384, inside the formula's slack.
# lean (fast's arithmetic without graphs or the wide outputs): 1.60 GiB beyond the time cache (x 0.76, same run),
# ordinary allocations that the DiT reuses between decodes (run I: 18.59 GiB NVML for the 4090 profile against
# fast's 20.58).
VAE_ACT_BYTES_PER_PIXEL = {"frame": 4640.0, "fast": 4640.0 * 1.24, "lean": 4640.0 * 0.76,
                           "tiny": 0.22 * GIB / (704 * 384)}
CONTEXT_BYTES = int(0.6 * GIB)  # CUDA context, cuBLAS/cuDNN handles, loaded kernels (NVML sees them)
ENCODER_ACT_BYTES = int(0.3 * GIB)  # activations of umT5 or wav2vec2 on one prompt / one file
ALLOCATOR_SLACK = 0.05  # caching-allocator fragmentation, as a fraction of the allocated peak
ACT_MARGIN = 1.1  # activations: headroom over the measured bf16 forward (W8A8 adds its int8 copies)
# Measured, not modelled: tools/bench.py on the H200 at 704x384 (2026-11-21, two runs) found the NVML peaks of
# the W8A8 profiles (4090, 16gb, 12gb) 1.8-2.2 GiB over the plan built from the bf16-fitted terms above (eager
# per-token activation quantization, int32 GEMM outputs and their fp32 rescale, cuDNN workspaces and the
# allocator's fragmentation around them). Planned as this much per query token of one forward, once per DiT
# call whatever its batch: the fused Triton GEMMs (the default since) make no int32/fp32 [M, N] temporaries
# (the NVML peaks of tools/bench.py run D were 0.3-0.4 GiB under the plans with this term), the int8 copies of
# a batched call's Linear inputs are in forward_activation_bytes, and its attention runs one sample at a time.
# Unmeasured for batch > 1: tools/bench.py prints NVML minus the plan for the batched runs (refit from those).
W8A8_UNATTRIBUTED_BYTES_PER_QUERY = int(2.0 * GIB / 3168)
HOST_RESERVE = 8 * GIB  # host RAM for the OS, Python, torch and the loader besides the plan's buffers
# attention "auto": the 8-bit kernel where INT8 tensor cores run >= 4x bf16 with fp32 accumulation, the GeForce
# cards of the profiles (sm_86: 3090 284 TOPS vs 71 TFLOP/s; sm_89: 4090 660 vs 165; data sheets, not measured
# here); SDPA elsewhere: on Hopper (sm_90) cuDNN's bf16 attention is faster than our 8-bit kernel (0.55x,
# BENCHMARKS.md §3), and on A100 (sm_80) and H100 INT8 is only 2x bf16.
EIGHT_BIT_ATTENTION_SM = ((8, 6), (8, 9))
# "auto" never takes SageAttention 2 (attention "sage", lowvram.kernels.sage): on the H100 its sm_90 kernel alone is
# 1.45x cuDNN's bf16 at the model's shape, but its per-call quantization of 15312 keys (0.99 ms) makes the call
# 0.87x, and the h100-80 / 4090 profiles ran 9% / 6% slower end to end (BENCHMARKS.md section 3, session 10).


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# ------------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class Sizes:
    """What the planner reads off the model and the checkpoint's files.

    dit: DiT tensor name -> bytes on the device (`dit_tensor_bytes` or the shard headers); exact: the
    latter. The encoder and VAE counts default to the released model's (used when no files are given)."""

    dit: Mapping[str, int] = field(default_factory=dict)
    exact: bool = False
    t5_embed_params: int = 256384 * 4096
    t5_other_params: int = 5_680_910_336 - 256384 * 4096
    wav2vec2_params: int = 315_000_000
    vae_decoder_params: int = 73_295_331 + 272
    vae_dim: int = VAE_REAL_DIM


@functools.lru_cache(maxsize=8)
def dit_tensor_bytes(cfg: DiTConfig, quant: str, float_bytes: int = 2) -> Mapping[str, int]:
    """Device bytes of every DiT tensor, read off the model built on the meta device: float tensors at
    `float_bytes`, the 8-bit Linear layers (those `lowvram quantize` converts) as int8/fp8 weights with
    fp32 per-channel scales and their bias in bf16."""
    from lowvram.model.dit import build_model
    from lowvram.quantize.linear import apply_quant_layers
    from lowvram.quantize.select import quantized_module

    model = build_model(cfg, "meta")
    if quant != "bf16":
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        apply_quant_layers(model, {m: quant for k, s in shapes.items() if (m := quantized_module(k, s))})
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        keeps_dtype = name.rpartition(".")[2] in ("qweight", "scale") or not t.is_floating_point()
        out[name] = t.numel() * (t.element_size() if keeps_dtype else float_bytes)
    return MappingProxyType(out)


_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_INJ = re.compile(r"^audio_injector\.(?:injector|injector_adain_layers)\.(\d+)\.")


def group_tensor_bytes(cfg: DiTConfig, tensor_bytes: Mapping[str, int]) -> tuple[list[list[int]], int]:
    """Split a checkpoint's tensor sizes into per-block lists (injector k joins block inject_layers[k]) and the rest."""
    blocks: list[list[int]] = [[] for _ in range(cfg.num_layers)]
    rest = 0
    for name, n in tensor_bytes.items():
        if m := _BLOCK.match(name):
            blocks[int(m.group(1))].append(int(n))
        elif m := _INJ.match(name):
            blocks[cfg.audio_inject_layers[int(m.group(1))]].append(int(n))
        else:
            rest += int(n)
    return blocks, rest


# ------------------------------------------------------------------------ token counts and activations
def token_counts(cfg: DiTConfig, width: int, height: int) -> dict[str, int]:
    """Tokens per latent frame, per forward (query), per ring cache and in the sink (docs/model.md §3.1)."""
    if width % 16 or height % 16 or width <= 0 or height <= 0:
        raise LowvramError(f"size {width}*{height}: width and height must be positive multiples of 16, e.g. 704*384")
    rows, cols = token_grid(height, width, cfg)
    lat_h, lat_w = height // 8, width // 8
    per_frame = rows * cols
    # sink: ref frame + FramePack post (1 frame) + 2x (1 frame at 1/2) + 4x (4 frames at 1/4 of the token grid)
    sink = 2 * per_frame + (lat_h // 4) * (lat_w // 4) + 4 * (lat_h // 8) * (lat_w // 8)
    return {"per_frame": per_frame, "query": FRAMES_PER_BLOCK * per_frame, "capacity": KV_FRAMES * per_frame,
            "sink": sink}


def forward_activation_bytes(cfg: DiTConfig, lq: int, lk: int, sink: int, attention: str, batch: int = 1) -> int:
    """Live activations of one DiT call over `batch` forwards of lq query tokens and lk keys (window + sink).

    Fitted to the bf16 model (lowvram.model.dit, H200): 0.618 GiB at 704x384 for both a 3168- and a
    15312-key forward, i.e. ~41 bytes per query token and channel, whatever the window; torch SDPA's
    [window; sink] concatenation (4 lk d) only wins for much longer windows. W8A8 adds the int8
    copies of a Linear input (lq (d + f)). A batch multiplies the token terms (attention runs one
    sample at a time, so its concatenation does not; the text context's K/V are computed once per call)."""
    d, f, t = cfg.dim, cfg.ffn_dim, cfg.text_len
    block = batch * (41 * lq * d + lq * (d + f)) + 2 * t * d  # the text context's K/V once per call
    if attention in JOINED:
        # sage's own per-call copies on top (one sample at a time): INT8 Q and K, V padded to 128 keys in bf16
        # and again in FP8 (kernels/sage.py)
        own = lq * d + 4 * lk * d if attention == Attention.SAGE else 0
        block = max(block, (batch - 1) * 41 * lq * d + 20 * lq * d + 2 * 2 * lk * d + 2 * sink * d + own)
    return int(ACT_MARGIN * block)


def resolve_attention(profile: Profile, capability: tuple[int, int] | None = None,
                      device_type: str = "cuda") -> tuple[Attention, str]:
    """The profile's attention backend with "auto" resolved by the GPU, and why (the plan records both).

    capability: the measured GPU's (major, minor); None plans for the card the profile is for (its
    compute_capability), as make_plan without a machine does. device_type "cpu" (the tiny checkpoint's runs):
    auto is sdpa there, the CPU having no INT8 tensor cores (triton8's CPU path dequantizes its window).
    Never an optional library (sage: slower end to end where measured, the note below EIGHT_BIT_ATTENTION_SM; fa4:
    its kernel 1.18x cuDNN's on an H100 but under 1% end to end, BENCHMARKS.md section 3): they are explicit
    choices."""
    if profile.attention != Attention.AUTO:
        return profile.attention, "set by the profile or an override"
    if device_type != "cuda":
        return Attention.SDPA, "auto on the CPU: no INT8 tensor cores to gain from"
    where = "this GPU"
    if capability is None:
        capability, where = profile.card_capability(), f"profile {profile.name}'s card, no GPU measured"
        if capability is None:
            return Attention.SDPA, "auto with no GPU measured and no card named by the profile"
    sm = f"sm_{capability[0]}{capability[1]}"
    if tuple(capability) in EIGHT_BIT_ATTENTION_SM:
        return Attention.TRITON8, f"auto on {sm} ({where}): INT8 tensor cores run >= 4x bf16 there"
    if tuple(capability) == (9, 0):
        return Attention.SDPA, (f"auto on {sm} ({where}): cuDNN's bf16 attention beats the 8-bit kernel on Hopper "
                                "(0.55x, BENCHMARKS.md section 3)")
    return Attention.SDPA, f"auto on {sm} ({where}): triton8 is picked on sm_86 and sm_89 only"


def kv_format_of(profile: Profile, attention: Attention | None = None) -> KVFormat:
    """How the step caches are stored: for triton8 (`attention`, resolved; default the profile's) the 8-bit
    kernel's format, on the GPU or in host memory (the same bytes over PCIe as int8; kv_dtype then only says how
    the sink is kept), else kv_dtype."""
    if (attention or profile.attention) == Attention.TRITON8:
        return KVFormat.KV8
    return KVFormat(profile.kv_dtype)


# ------------------------------------------------------------------------ the plan's steps
@dataclass(frozen=True)
class _Model:
    """The quantities every step of make_plan reads."""

    profile: Profile
    attention: Attention  # the profile's, resolved (resolve_attention)
    cfg: DiTConfig
    width: int
    height: int
    tokens: dict
    slab: list[int]  # device bytes of each block with its attached injector, every tensor aligned
    rest: int  # everything outside the blocks and injectors
    kv_format: KVFormat
    sink_dtype: str
    sizes: Sizes
    steps: tuple[int, ...]  # the denoising steps whose caches this plan holds
    batch: int  # forwards per DiT call: 1 (sequential) or one per held step (batched ticks)
    decode: bool = True  # this process holds the VAE decoder (a pipeline rank that only denoises does not)
    overlap: bool = False  # the decode runs beside the DiT: both activations at once
    graphs: bool = False  # the DiT call is a CUDA graph, whose pool keeps its activations between calls
    gpu_sink_room: int = 0  # sink tokens behind every layer's window of each GPU step cache (_with_gpu_sink_room)

    @property
    def host_kv(self) -> bool:
        return self.profile.kv_placement == "host"

    @property
    def tok_kv(self) -> int:
        return kv_token_bytes(self.cfg.num_heads, self.cfg.head_dim, self.kv_format)


def _weights(profile: Profile, cfg: DiTConfig, sizes: Sizes) -> tuple[list[int], int]:
    groups, rest = group_tensor_bytes(cfg, sizes.dit or dit_tensor_bytes(cfg, profile.quant))
    return [sum(align(n) for n in g) for g in groups], rest


def _fixed_items(m: _Model) -> list[PlanItem]:
    """What the generate phase holds whatever the residency: non-block params, sink, KV, VAE, W8A8 transients."""
    cfg, tk, L = m.cfg, m.tokens, m.cfg.num_layers
    H, D = cfg.num_heads, cfg.head_dim
    cap, lq, sink = tk["capacity"], tk["query"], tk["sink"]
    items = [PlanItem("DiT non-block params (embeddings, head, audio encoder, frame packer)", "gpu", m.rest, "bf16"),
             PlanItem(f"sink K/V ({sink} tokens x {L} layers)", "gpu", L * sink * kv_token_bytes(H, D, m.sink_dtype),
                      m.sink_dtype)]
    S, B = len(m.steps), m.batch
    if m.host_kv:
        slots = slots_for(B, m.profile.kv_layers_ahead)
        note = {KVFormat.BF16: "bf16 windows", KVFormat.INT8: "bf16 windows + int8 staging",
                KVFormat.KV8: "kv8 windows, read by the 8-bit kernel + V/scale staging"}[m.kv_format]
        sink_room = _sink_room(m.attention, m.kv_format, sink)
        note += f", each with the sink behind it ({sink_room} tokens)" if sink_room else ""
        items.append(PlanItem(f"KV working windows (a ring of {slots}: {B} forward(s) x 1 layer + "
                              f"{slots - B})", "gpu",
                              kv_workspace_bytes(cap, lq, H, D, m.kv_format, slots, sink=sink_room), note))
    else:
        items.append(PlanItem(f"KV ring caches ({S} steps x {cap} tokens)", "gpu", S * L * cap * m.tok_kv,
                              m.kv_format.value))
        if m.gpu_sink_room:
            items.append(PlanItem(f"sink room behind the KV windows ({S} steps x {L} layers x {m.gpu_sink_room} "
                                  "tokens)", "gpu", S * L * m.gpu_sink_room * m.tok_kv,
                                  "sdpa reads the window and the sink in one buffer, no torch.cat"))
    if m.kv_format == KVFormat.KV8:  # each cache's per-layer K mean stays on the device (no PCIe bytes)
        items.append(PlanItem(f"kv8 K smoothing means ({S} caches x {L} layers)", "gpu", S * kv8_mean_bytes(L, 1, H, D),
                              "fp32"))
    if m.decode:
        items.append(vae_decoder_item(m.sizes, m.width, m.height))
    if m.profile.quant != "bf16":  # planned once, not per forward of a batched call (see the constant)
        items.append(PlanItem("W8A8 transients + fragmentation (measured on H200)", "gpu",
                              W8A8_UNATTRIBUTED_BYTES_PER_QUERY * lq, "tools/bench.py"))
    return items


def _sink_room(attention: Attention, kv_format: KVFormat, sink: int) -> int:
    """Sink tokens behind each bf16 window slot of a host-cache workspace: sdpa (and the libraries on its inputs,
    JOINED) then reads [window; sink] from one buffer instead of concatenating them per layer
    (HostKVCache.joined); none for kv8 (its kernel reads the sink where it is) or the Triton kernels."""
    return sink if attention in JOINED and kv_format != KVFormat.KV8 else 0


def workspace_sink_tokens(plan) -> int:
    """The sink tokens a plan's host-cache workspace holds behind each window (the planner's own rule)."""
    return _sink_room(plan.attention, KVFormat(plan.kv_format), plan.tokens["sink"])


def _with_gpu_sink_room(m: _Model, plan: Plan, budget: int, host_ram_bytes: int | None, encode: bool) -> Plan:
    """`plan` (of `m`, without sink room) with room for the sink behind every layer's window of each GPU step
    cache (GpuKVCache.joined: sdpa then reads [window; sink] in place instead of torch.cat copying both per
    layer and sample: CatArrayBatchedCopy, 6.2 ms of a 40-block forward on the H200, tools/trace_forward.py),
    where the room costs no residency: the plan with it keeps the same blocks resident at this batch. Otherwise
    (it would stream one more block, or not fit) the plan stays without it and sdpa concatenates: a streamed
    block costs more per forward than the copies (its slab over PCIe, ~0.4 GB a call), and the room is large
    (L x sink tokens per cache: 2.0 GiB at 704x384). Only bf16 GPU caches under JOINED's backends have any (kv8 caches
    are read in place by the 8-bit kernel, and the Triton kernels read the sink where it is)."""
    room = _sink_room(m.attention, m.kv_format, m.tokens["sink"])
    if m.host_kv or not room:
        return plan
    try:
        roomy = _plan(replace(m, gpu_sink_room=room), budget, host_ram_bytes, encode)
    except LowvramError:
        return plan
    return roomy if roomy.streamed == plan.streamed else plan


def vae_decoder_item(sizes: Sizes, width: int, height: int) -> PlanItem:
    """The streaming VAE decoder's parameters and its time cache at width x height."""
    scale = sizes.vae_dim / VAE_REAL_DIM
    return PlanItem("VAE decoder + time cache", "gpu",
                    int(2 * sizes.vae_decoder_params + scale * VAE_CACHE_BYTES_PER_PIXEL * width * height), "bf16")


def vae_activation_bytes(sizes: Sizes, vae_decode: str, width: int, height: int) -> int:
    """Activations of one latent frame's decode (4 frames out)."""
    width_ratio = 1.0 if vae_decode == "tiny" else sizes.vae_dim / VAE_REAL_DIM  # TAEHV's own width
    return int(VAE_ACT_BYTES_PER_PIXEL[vae_decode] * width_ratio * width * height)


def _activations(m: _Model) -> PlanItem:
    tk = m.tokens
    act_dit = forward_activation_bytes(m.cfg, tk["query"], tk["capacity"] + tk["sink"], tk["sink"], m.attention,
                                       m.batch)
    act_vae = vae_activation_bytes(m.sizes, m.profile.vae_decode, m.width, m.height) if m.decode else 0
    if not m.decode:
        return PlanItem("activations: one DiT forward", "gpu", act_dit, f"DiT {act_dit / GIB:.2f} (no VAE here)")
    why = f"DiT {act_dit / GIB:.2f}, VAE {act_vae / GIB:.2f} ({m.profile.vae_decode})"
    if m.overlap:  # the decode of block b runs on its own stream beside block b+1's forward
        return PlanItem("activations: DiT forward + VAE decode of one latent frame (overlapped)", "gpu",
                        act_dit + act_vae, why)
    if m.graphs:  # the graph's pool holds the DiT call's activations while the decode runs between calls
        return PlanItem("activations: DiT forward (CUDA graph pool) + VAE decode of one latent frame", "gpu",
                        act_dit + act_vae, why)
    return PlanItem("activations: max(DiT forward, VAE decode of one latent frame)", "gpu", max(act_dit, act_vae), why)


def _generate_peak(m: _Model, fixed: list[PlanItem], act: PlanItem, streamed: set[int]) -> tuple[int, list[PlanItem]]:
    L, prof = m.cfg.num_layers, m.profile
    res = [i for i in range(L) if i not in streamed]
    items = [PlanItem(f"DiT blocks resident ({len(res)})", "gpu", sum(m.slab[i] for i in res), prof.quant)]
    if streamed:
        nb = min(prof.prefetch_blocks + 1, len(streamed))
        items.append(PlanItem(f"streamed-block buffers ({nb})", "gpu", nb * max(m.slab[i] for i in streamed),
                              f"{len(streamed)} blocks stream"))
    items += fixed + [act]
    allocated = sum(it.nbytes for it in items)
    slack = int(ALLOCATOR_SLACK * allocated)
    items.append(PlanItem("CUDA context + allocator slack", "gpu", CONTEXT_BYTES + slack,
                          f"{ALLOCATOR_SLACK:.0%} of allocated"))
    return allocated + CONTEXT_BYTES + slack, items


def _encode_phase(m: _Model, budget: int) -> tuple[int, PlanItem]:
    """The umT5/wav2vec2 phase before the DiT is placed; raises if it alone breaks the budget."""
    prof, s = m.profile, m.sizes
    t5 = 0 if prof.t5 == "cpu" else int(2 * s.t5_embed_params + T5_BYTES_PER_PARAM[prof.t5] * s.t5_other_params)
    alloc = max(t5, 2 * s.wav2vec2_params) + ENCODER_ACT_BYTES
    peak = int(alloc * (1 + ALLOCATOR_SLACK)) + CONTEXT_BYTES
    if peak > budget:
        smaller = {"bf16": "t5=int8, t5=nf4 or t5=cpu", "int8": "t5=nf4 or t5=cpu", "nf4": "t5=cpu"}
        fix = f"--set {smaller[prof.t5]}" if prof.t5 in smaller else "a larger vram_budget_gib"
        raise LowvramError(f"profile {prof.name}: the encoders (umT5 {prof.t5}) need {peak / GIB:.1f} GiB, over "
                           f"the {prof.vram_budget_gib:.1f} GiB budget; use {fix}")
    return peak, PlanItem(f"umT5 encoder ({prof.t5})", "gpu (encode phase)", t5, "freed before the DiT loads")


def _choose_streamed(m: _Model, order: list[int], peak_of, budget: int) -> set[int]:
    """The blocks that stream: as few as the budget allows ("auto"), none ("all"), or L - count."""
    L, prof = m.cfg.num_layers, m.profile
    want = {"all": L}.get(prof.blocks_resident, prof.blocks_resident)
    if want == "auto":
        n_stream = next((k for k in range(L + 1) if peak_of(set(order[:k])) <= budget), None)
        if n_stream is None:
            need = math.ceil(peak_of(set(order)) / GIB * 10) / 10
            hint = "" if m.host_kv else ", or --set kv_placement=host kv_dtype=int8"
            raise LowvramError(f"profile {prof.name} at {m.width}*{m.height} does not fit {prof.vram_budget_gib:.1f} "
                               f"GiB even with every block streamed; the smallest budget that fits is {need} GiB "
                               f"(--set vram_budget_gib={need}{hint})")
        return set(order[:n_stream])
    if want > L:
        raise LowvramError(f"blocks_resident={want} but the model has {L} blocks; use --set blocks_resident={L} or auto")
    peak = peak_of(set(order[:L - want]))
    if peak > budget:
        most = max((L - k for k in range(L + 1) if peak_of(set(order[:k])) <= budget), default=None)
        fix = f"--set blocks_resident={most} or auto" if most is not None else "a larger vram_budget_gib"
        raise LowvramError(f"profile {prof.name}: {want} resident blocks need {peak / GIB:.1f} GiB, "
                           f"over the {prof.vram_budget_gib:.1f} GiB budget; use {fix}")
    return set(order[:L - want])


@dataclass
class _Host:
    pinned: int = 0
    pageable: int = 0
    pinned_caches: int = 0
    pinned_blocks: list = field(default_factory=list)
    items: list = field(default_factory=list)


def _host_memory(m: _Model, streamed: set[int], host_ram_bytes: int | None) -> _Host:
    """KV caches first (their traffic recurs every forward), then streamed slabs, up to the pinned budget."""
    L, prof, cap = m.cfg.num_layers, m.profile, m.tokens["capacity"]
    pin_left = int(prof.pinned_budget_gib * GIB)
    h = _Host()
    if m.host_kv:
        per_cache = L * cap * m.tok_kv
        for _ in m.steps:
            if per_cache <= pin_left:
                h.pinned, pin_left, h.pinned_caches = h.pinned + per_cache, pin_left - per_cache, h.pinned_caches + 1
            else:
                h.pageable += per_cache
        h.items.append(PlanItem(f"KV ring caches ({len(m.steps)} steps x {cap} tokens)", "host",
                                len(m.steps) * per_cache, m.kv_format.value))
    for i in sorted(streamed):
        if m.slab[i] <= pin_left:
            h.pinned, pin_left = h.pinned + m.slab[i], pin_left - m.slab[i]
            h.pinned_blocks.append(i)
        else:
            h.pageable += m.slab[i]
    if streamed:
        h.items.append(PlanItem(f"streamed block slabs ({len(streamed)})", "host", sum(m.slab[i] for i in streamed),
                                prof.quant))
    if h.pageable:
        h.items.append(PlanItem("  of which pageable (over pinned_budget_gib)", "host", h.pageable, "~5x slower copies"))
    if host_ram_bytes is not None and h.pinned + h.pageable + HOST_RESERVE > host_ram_bytes:
        need = math.ceil((h.pinned + h.pageable + HOST_RESERVE) / GIB)
        hint = " or --set kv_dtype=int8" if m.host_kv and m.kv_format == KVFormat.BF16 else ""
        raise LowvramError(f"profile {prof.name} keeps {(h.pinned + h.pageable) / GIB:.1f} GiB in host memory (+"
                           f"{HOST_RESERVE // GIB} GiB for the process) but the host has {host_ram_bytes / GIB:.1f} GiB "
                           f"RAM; it needs {need} GiB: use a larger vram budget (fewer streamed blocks){hint}")
    return h


# ------------------------------------------------------------------------ make_plan
def make_plan(profile: Profile, cfg: DiTConfig, width: int, height: int, free_vram_bytes: int | None = None,
              host_ram_bytes: int | None = None, tensor_bytes: Mapping[str, int] | None = None,
              sink_dtype: str | None = None, sizes: Sizes | None = None, steps: Sequence[int] | None = None,
              decode: bool = True, encode: bool = True, capability: tuple[int, int] | None = None,
              device_type: str = "cuda") -> Plan:
    """Decide residency, KV placement and format, and buffers for `profile` at width x height; raise
    LowvramError if nothing fits.

    steps: the denoising steps whose caches this plan holds (default all NUM_STEPS; a rank of the
    timestep-forcing pipeline holds its own); with the profile's schedule "batched", one DiT call runs
    `plan.batch` forwards of a tick and streamed blocks cross PCIe once per call. The batch is a divisor
    of len(steps) (so every steady tick is len(steps) / batch full calls), 2 or more, chosen among those
    whose plan fits for the fewest PCIe bytes per forward (the largest on a tie); where none fits, the
    plan is the sequential one (batch 1).
    decode / encode: whether this process holds the VAE decoder / runs the encoders (umT5, wav2vec2)
    before the DiT is placed; a rank of the pipeline that only denoises plans neither.

    free_vram_bytes / host_ram_bytes: what the machine has (None: plan for the named card without checking);
    tensor_bytes: DiT tensor name -> bytes from a checkpoint's shard headers (exact weights; else the meta
    model's); sizes: the encoders' and VAE's sizes read from the checkpoint (else the released model's);
    sink_dtype: how the model stores the sink K/V ("bf16" | "int8"; default: the profile's kv_dtype).
    capability, device_type: the GPU's compute capability (None: the card the profile names) and the device
    type, for the profile's attention "auto" (resolve_attention).
    """
    args = (cfg, width, height, free_vram_bytes, host_ram_bytes, tensor_bytes, sink_dtype, sizes, steps, decode,
            encode, capability, device_type)
    if not decode or profile.vae_decode != "fast":
        return _make_plan(profile, *args)
    # "fast" decodes with CUDA graphs and wide conv outputs, whose memory the "lean" decoder saves: take lean where
    # fast would cost a resident block, the batch, or the fit (a decoder ~10 ms a block slower against one more
    # streamed block's ~0.4 GB over PCIe per call)
    try:
        fast = _make_plan(profile, *args)
    except LowvramError:  # where neither fits, lean's error says what would (it needs the least)
        return _make_plan(replace(profile, vae_decode="lean"), *args)
    lean = _make_plan(replace(profile, vae_decode="lean"), *args)
    return fast if (fast.batch, len(fast.resident)) >= (lean.batch, len(lean.resident)) else lean


def _make_plan(profile: Profile, cfg: DiTConfig, width: int, height: int, free_vram_bytes: int | None = None,
               host_ram_bytes: int | None = None, tensor_bytes: Mapping[str, int] | None = None,
               sink_dtype: str | None = None, sizes: Sizes | None = None, steps: Sequence[int] | None = None,
               decode: bool = True, encode: bool = True, capability: tuple[int, int] | None = None,
               device_type: str = "cuda") -> Plan:
    """make_plan for the profile's own vae_decode."""
    name, budget = profile.name, int(profile.vram_budget_gib * GIB)
    tk = token_counts(cfg, width, height)
    if free_vram_bytes is not None and budget > free_vram_bytes:
        fits = math.floor(free_vram_bytes / GIB * 10) / 10
        raise LowvramError(f"profile {name} budgets {profile.vram_budget_gib:.1f} GiB but the GPU has only "
                           f"{free_vram_bytes / GIB:.1f} GiB free; use --set vram_budget_gib={fits} or a smaller profile")
    sizes = sizes or Sizes()
    if tensor_bytes:
        sizes = replace(sizes, dit=dict(tensor_bytes), exact=True)
    attention, why = resolve_attention(profile, capability, device_type)
    kv_format = kv_format_of(profile, attention)
    sink = sink_dtype or profile.kv_dtype  # an int8 sink with kv8 host caches too (the 8-bit kernel takes bf16 layers)
    slab, rest = _weights(profile, cfg, sizes)
    steps = tuple(range(NUM_STEPS)) if steps is None else tuple(steps)

    def plan_at(batch: int, overlap: bool, graphs: bool = False) -> Plan:
        m = _Model(profile, attention, cfg, width, height, tk, slab, rest, kv_format, sink, sizes, steps, batch, decode,
                   overlap, graphs)
        plan = _with_gpu_sink_room(m, _plan(m, budget, host_ram_bytes, encode), budget, host_ram_bytes, encode)
        return replace(plan, attention_why=why, vae_overlap=overlap, cuda_graphs=graphs)

    plan = _choose_overlap(profile, decode, len(steps), plan_at)
    return _with_graphs(profile, plan, device_type, lambda: plan_at(plan.batch, plan.vae_overlap, True))


def _choose_overlap(profile: Profile, decode: bool, n_steps: int, plan_at) -> Plan:
    """The plan of the best batch for the profile's vae_overlap (plan_at(batch, overlap) makes one; n_steps: the
    held steps)."""

    def best(overlap: bool) -> Plan:
        if profile.schedule == "batched":
            fits = []
            for batch in (c for c in range(n_steps, 1, -1) if n_steps % c == 0):
                try:
                    fits.append(plan_at(batch, overlap))
                except LowvramError:
                    continue
            if fits:
                return min(fits, key=lambda p: (p.pcie_h2d_bytes, -p.batch))
        return plan_at(1, overlap)

    # vae_overlap: "on" and "off" as said (a process without the decoder never overlaps); "auto" prefers the
    # overlapped plan even when it streams more blocks (one 704x384 block's decode is ~0.12 s on an H200, one
    # more streamed block ~0.4 GB over PCIe per call), unless only a smaller batch fits with it (batching is
    # worth more: 1.11-1.27x, BENCHMARKS.md run F) or it does not fit at all
    if not decode or profile.vae_overlap == "off":
        return best(False)
    if profile.vae_overlap == "on":
        return best(True)
    try:
        overlapped = best(True)
    except LowvramError as e:  # where neither fits, the overlapped plan's error says what would ("auto"'s choice)
        try:
            return best(False)
        except LowvramError:
            raise e from None
    try:
        serial = best(False)
    except LowvramError:
        return overlapped
    return overlapped if overlapped.batch >= serial.batch else serial


def graphs_blocker(plan: Plan) -> str:
    """What `plan` lacks for its DiT calls to replay a CUDA graph (runtime/graphs.py), '' where nothing."""
    if plan.streamed:
        return f"every block resident (this plan streams {len(plan.streamed)})"
    if "host" in plan.kv_caches or plan.kv_format != KVFormat.BF16:
        return f"the step caches on the GPU in bf16 (this plan: {plan.kv_caches[0]}, {plan.kv_format})"
    if plan.batch != len(plan.steps):
        return (f"each DiT call to run all {len(plan.steps)} held steps (this plan: {plan.batch} a call; "
                "--set schedule=batched)")
    return ""


def _with_graphs(profile: Profile, plan: Plan, device_type: str, graphed) -> Plan:
    """`plan` with the profile's cuda_graphs resolved: "on" takes the graphed plan (graphed()) or says what is
    missing; "auto" takes it where the plan allows graphs and their memory (the DiT's activations kept beside the
    decoder's) costs no batch, resident block or sink room; "off" never. Off without a CUDA device whatever the
    profile says (the CPU has no graphs; a profile's "on" stays valid there)."""
    mode, why = profile.cuda_graphs, graphs_blocker(plan)
    if mode == "off":
        return replace(plan, graphs_why="cuda_graphs off")
    if device_type != "cuda":
        return replace(plan, graphs_why="needs a CUDA GPU")
    if why:
        if mode == "on":
            raise LowvramError(f"profile {profile.name}: cuda_graphs=on needs {why}; use --set cuda_graphs=auto")
        return replace(plan, graphs_why=f"needs {why}")
    try:
        g = graphed()
    except LowvramError:
        if mode == "on":
            raise
        return replace(plan, graphs_why="its memory does not fit")
    if mode == "on" or (g.batch, g.resident, g.gpu_kv_sink) == (plan.batch, plan.resident, plan.gpu_kv_sink):
        lacks = graphs_blocker(g)
        if lacks:
            raise LowvramError(f"profile {profile.name}: cuda_graphs=on needs {lacks} once the graph's memory is "
                               "counted; use --set cuda_graphs=auto")
        return replace(g, graphs_why="the steady calls replay a captured call")
    return replace(plan, graphs_why="its memory would cost a resident block, the batch or the sink room")


def _plan(m: _Model, budget: int, host_ram_bytes: int | None, encode: bool = True) -> Plan:
    """The plan of one batch size (make_plan)."""
    profile, cfg, tk, slab, steps, batch = m.profile, m.cfg, m.tokens, m.slab, m.steps, m.batch
    fixed, act = _fixed_items(m), _activations(m)
    encode_peak, t5_item = _encode_phase(m, budget) if encode else (0, None)
    order = stream_order(cfg.num_layers, [i for i in cfg.audio_inject_layers if i < cfg.num_layers])
    streamed = _choose_streamed(m, order, lambda s: _generate_peak(m, fixed, act, s)[0], budget)
    gen_peak, items = _generate_peak(m, fixed, act, streamed)
    host = _host_memory(m, streamed, host_ram_bytes)
    L, lq, cap = cfg.num_layers, tk["query"], tk["capacity"]
    n_buffers = min(profile.prefetch_blocks + 1, len(streamed))
    kv_window = L * (cap - lq) * m.tok_kv if m.host_kv else 0
    return Plan(profile=profile, width=m.width, height=m.height, tokens=tk,
                resident=tuple(i for i in range(L) if i not in streamed), streamed=tuple(sorted(streamed)),
                n_buffers=n_buffers, kv_caches=(profile.kv_placement,) * len(steps), kv_dtype=profile.kv_dtype,
                kv_format=m.kv_format.value, kv_slots=slots_for(batch, profile.kv_layers_ahead) if m.host_kv else 0,
                block_bytes=tuple(slab), demote_order=tuple(order),
                items=tuple(items + host.items + ([t5_item] if t5_item else [])),
                encode_peak_bytes=encode_peak, generate_peak_bytes=gen_peak,
                pcie_h2d_bytes=sum(slab[i] for i in streamed) // batch + kv_window, steps=steps, batch=batch,
                streamed_bytes_per_call=sum(slab[i] for i in streamed),
                pcie_d2h_bytes=L * lq * m.tok_kv if m.host_kv else 0,
                host_pinned_bytes=host.pinned, host_pageable_bytes=host.pageable, pinned_kv_caches=host.pinned_caches,
                pinned_blocks=tuple(host.pinned_blocks), exact_bytes=m.sizes.exact, sink_dtype=m.sink_dtype,
                gpu_kv_sink=m.gpu_sink_room,
                quant=profile.quant, attention=m.attention, gemm=profile.gemm, t5=profile.t5,
                host_reserve_bytes=HOST_RESERVE)
