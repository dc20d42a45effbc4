"""The residency planner: from a profile, the DiT config and a resolution, decide what lives where.

`make_plan` picks the DiT blocks that stay resident (the rest stream from host memory through
`n_buffers` GPU slabs), places the four step KV caches, counts the bytes that cross PCIe per
forward and adds up the expected peak VRAM. Everything is computed from `DiTConfig` (or, for a
quantized checkpoint, from the exact tensor sizes of its shard headers); `lowvram.memory_model`
constants below are estimates to calibrate against the benchmark's measured peak.

Peak = the larger of two phases:
- encode: umT5 (per the profile's t5 mode) or wav2vec2, before the DiT is placed;
- generate: resident DiT weights + streamed-block buffers + KV (GPU caches, or the working
  buffers of host caches) + sink K/V + VAE decoder and its time cache + the larger of one DiT
  forward's activations and one latent frame's VAE decode activations,
plus the CUDA context and allocator slack.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

from lowvram.constants import FRAMES_PER_BLOCK, KV_FRAMES, NUM_STEPS
from lowvram.errors import LowvramError
from lowvram.model.config import DiTConfig, token_grid
from lowvram.runtime.kv_cache import kv_token_bytes, kv_workspace_bytes
from lowvram.runtime.offload import ALIGN, stream_order
from lowvram.runtime.profile import GIB, Profile

KV_SLOTS = 2  # GPU working windows of a host KV cache (layers in flight)
# umT5-XXL encoder (docs/model.md §1.2): token embedding and the rest (24 blocks, all Linear but the norms)
T5_EMBED_PARAMS = 256384 * 4096
T5_OTHER_PARAMS = 5_680_910_336 - T5_EMBED_PARAMS
T5_BYTES_PER_PARAM = {"bf16": 2.0, "int8": 1.0 + 4 / 4096, "nf4": 0.5 + 4 / 64, "cpu": 0.0}
WAV2VEC2_PARAMS = 315_000_000
# Wan2.1 VAE decoder (docs/model.md §7) in bf16. Time cache: 2 frames of the input of every causal conv:
# 4240 channels at 1/8 resolution, 2496 at 1/4, 1152 at 1/2, 672 at full size (per pixel of one frame).
VAE_DECODER_PARAMS = 73_295_331 + 272
VAE_CACHE_BYTES_PER_PIXEL = 2 * 2 * (4240 / 64 + 2496 / 16 + 1152 / 4 + 672)
# One latent frame's decode (4 frames out), per output pixel: measured 1.17 GiB at 704x384 (H200, bf16,
# lowvram.model.vae at 601ec55; the cache formula above matched to the byte). Tiled: an estimate (2x2 tiles).
VAE_ACT_BYTES_PER_PIXEL = {"frame": 4640.0, "tiled": 4640.0 / 3}
CONTEXT_BYTES = int(0.6 * GIB)  # CUDA context, cuBLAS/cuDNN handles, loaded kernels (NVML sees them)
ALLOCATOR_SLACK = 0.05  # caching-allocator fragmentation, as a fraction of the allocated peak
ACT_MARGIN = 1.1  # activations: headroom over the measured bf16 forward (W8A8 adds its int8 copies)
# Measured, not modelled: tools/bench.py on the H200 at 704x384 (2026-11-21, two runs) found the NVML peaks of
# the W8A8 profiles (4090, 16gb, 12gb) 1.8-2.2 GiB over the plan built from the bf16-fitted terms above (eager
# per-token activation quantization, int32 GEMM outputs and their fp32 rescale, cuDNN workspaces and the
# allocator's fragmentation around them). Planned as this much per query token.
W8A8_UNATTRIBUTED_BYTES_PER_QUERY = int(2.0 * GIB / 3168)
HOST_RESERVE = 8 * GIB  # host RAM for the OS, Python, torch and the loader besides the plan's buffers
PCIE_4090 = 23e9  # bytes/s, pinned host->GPU on PCIe 4.0 x16 (docs/model.md §9)


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# ------------------------------------------------------------------------ parameter accounting
def _linear(out_f: int, in_f: int, quant: str) -> list[int]:
    """Tensor bytes of one Linear with bias: weight (+ fp32 per-channel scale when 8-bit), bf16 bias."""
    if quant == "bf16":
        return [out_f * in_f * 2, out_f * 2]
    return [out_f * in_f, out_f * 4, out_f * 2]


def block_tensor_bytes(cfg: DiTConfig, quant: str) -> list[int]:
    """Bytes of every tensor of one transformer block (self/cross attention, norm3, FFN, modulation)."""
    d, f = cfg.dim, cfg.ffn_dim
    t: list[int] = []
    for _ in range(2):  # self_attn, cross_attn: q, k, v, o + norm_q, norm_k
        for _ in range(4):
            t += _linear(d, d, quant)
        t += [d * 2, d * 2]
    t += [d * 2, d * 2]  # norm3 weight, bias
    t += _linear(f, d, quant) + _linear(d, f, quant)
    t += [6 * d * 2]  # modulation [1, 6, dim]
    return t


def injector_tensor_bytes(cfg: DiTConfig, quant: str) -> list[int]:
    """Bytes of one audio injector (cross-attention q, k, v, o + norms) and its AdaLN linear."""
    d = cfg.dim
    t: list[int] = []
    for _ in range(4):
        t += _linear(d, d, quant)
    t += [d * 2, d * 2] + _linear(2 * d, d, quant)
    return t


def other_params(cfg: DiTConfig) -> int:
    """Parameters outside the blocks and injectors (embeddings, head, audio encoder, frame packer), kept bf16."""
    d, p = cfg.dim, math.prod(cfg.patch_size)
    a4, a2 = d // cfg.num_audio_token, d // 2
    return (cfg.in_dim * d * p + d  # patch_embedding
            + cfg.text_dim * d + d + d * d + d  # text_embedding
            + cfg.freq_dim * d + d + d * d + d  # time_embedding
            + d * 6 * d + 6 * d  # time_projection
            + cfg.out_dim * p * d + cfg.out_dim * p + 2 * d  # head
            + cfg.cond_dim * d * p + d  # cond_encoder
            + cfg.num_audio_layers + cfg.audio_dim * d * 3 + d + cfg.audio_dim * a4 * 3 + a4  # audio encoder
            + a4 * a2 * 3 + a2 + a2 * d * 3 + d + d * d + d + d
            + 3 * d  # trainable_cond_mask
            + sum(cfg.in_dim * d * k + d for k in (4, 32, 256)))  # frame_packer proj, proj_2x, proj_4x


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


# ------------------------------------------------------------------------ token counts
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


def forward_activation_bytes(cfg: DiTConfig, lq: int, lk: int, sink: int, attention: str) -> int:
    """Live activations of one DiT forward over lq query tokens and lk keys (window + sink).

    Fitted to the bf16 model (lowvram.model.dit, H200): 0.618 GiB at 704x384 for both a 3168- and a
    15312-key forward, i.e. ~41 bytes per query token and channel, whatever the window; torch SDPA's
    [window; sink] concatenation (4 lk d) only wins for much longer windows. W8A8 adds the int8
    copies of a Linear input (lq (d + f))."""
    d, f, t = cfg.dim, cfg.ffn_dim, cfg.text_len
    block = 41 * lq * d + 2 * t * d + lq * (d + f)
    if attention == "sdpa":
        block = max(block, 20 * lq * d + 2 * 2 * lk * d + 2 * sink * d)
    return int(ACT_MARGIN * block)


# ------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class PlanItem:
    what: str
    where: str  # "gpu" | "pinned" | "pageable" | "gpu (encode phase)"
    nbytes: int
    note: str = ""


@dataclass(frozen=True)
class Plan:
    """What lives where for one profile, model and resolution; render() prints it."""

    profile: Profile
    width: int
    height: int
    tokens: dict
    resident: tuple[int, ...]
    streamed: tuple[int, ...]
    n_buffers: int
    kv_caches: tuple[str, ...]  # placement of each step's cache: "gpu" | "host"
    kv_dtype: str
    kv_slots: int
    block_bytes: tuple[int, ...]  # slab bytes of each block (with its attached injector)
    demote_order: tuple[int, ...]  # order in which blocks leave the GPU (planner and OOM fallback agree)
    items: tuple[PlanItem, ...]
    encode_peak_bytes: int
    generate_peak_bytes: int
    pcie_h2d_bytes: int  # host->GPU bytes of one full-window forward
    pcie_d2h_bytes: int  # GPU->host bytes (write-back of the new K/V chunk)
    host_pinned_bytes: int
    host_pageable_bytes: int
    pinned_kv_caches: int  # how many of the host step caches get page-locked memory
    pinned_blocks: tuple[int, ...]  # streamed blocks whose slabs are page-locked
    exact_bytes: bool  # True when block sizes came from a quantized checkpoint's headers
    sink_dtype: str = "bf16"  # how the sink K/V are kept on the GPU ("bf16" | "int8")

    @property
    def peak_bytes(self) -> int:
        return max(self.encode_peak_bytes, self.generate_peak_bytes)

    def headline(self) -> str:
        """One line for the progress display."""
        scheme = "bf16" if self.profile.quant == "bf16" else f"{self.profile.quant} W8A8"
        return (f"{len(self.resident)}/{len(self.block_bytes)} blocks resident, KV {self.kv_caches[0]} "
                f"{self.kv_dtype}, {scheme}, expected peak {self.peak_bytes / GIB:.1f} GiB")

    def render(self) -> str:
        """The plan as a text table (rich, no colour)."""
        from rich.console import Console
        from rich.table import Table

        tk = self.tokens
        title = (f"profile {self.profile.name} at {self.width}*{self.height}: {tk['per_frame']} tokens/frame, "
                 f"{tk['query']} query, KV {tk['capacity']} + sink {tk['sink']}")
        table = Table(title=title, title_justify="left")
        for col, just in (("item", "left"), ("where", "left"), ("GiB", "right"), ("note", "left")):
            table.add_column(col, justify=just)
        for it in self.items:
            table.add_row(it.what, it.where, f"{it.nbytes / GIB:.2f}", it.note)
        console = Console(width=130, record=True, color_system=None, file=_Null())
        console.print(table)
        h2d, d2h = self.pcie_h2d_bytes, self.pcie_d2h_bytes
        lines = [
            f"blocks resident: {_ranges(self.resident) or 'none'}; streamed: {_ranges(self.streamed) or 'none'} "
            f"({self.n_buffers} GPU buffers)",
            f"PCIe per forward: {h2d / 1e9:.2f} GB in, {d2h / 1e9:.2f} GB out "
            f"(~{1e3 * (h2d + d2h) / PCIE_4090:.0f} ms at {PCIE_4090 / 1e9:.0f} GB/s)",
            f"host memory: {self.host_pinned_bytes / GIB:.1f} GiB pinned, {self.host_pageable_bytes / GIB:.1f} GiB pageable",
            f"expected peak: {self.peak_bytes / GIB:.2f} GiB (encode {self.encode_peak_bytes / GIB:.2f}, generate "
            f"{self.generate_peak_bytes / GIB:.2f}) of a {self.profile.vram_budget_gib:.1f} GiB budget"
            + ("" if self.exact_bytes else "; weights estimated from config.json"),
        ]
        return console.export_text() + "\n".join(lines) + "\n"


class _Null:
    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def _ranges(ix: tuple[int, ...]) -> str:
    out, start = [], None
    for a, b in zip(ix, ix[1:] + (None,)):
        start = a if start is None else start
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = None
    return ",".join(out)


# ------------------------------------------------------------------------ make_plan
def make_plan(profile: Profile, cfg: DiTConfig, width: int, height: int, free_vram_bytes: int | None = None,
              host_ram_bytes: int | None = None, quantized_bytes: Mapping[str, int] | None = None,
              sink_dtype: str | None = None) -> Plan:
    """Decide residency, KV placement and buffers for `profile` at width x height; raise LowvramError if nothing fits.

    free_vram_bytes / host_ram_bytes: what the machine has (None: plan for the named card without checking);
    quantized_bytes: tensor name -> bytes from a quantized checkpoint's shard headers (exact weights);
    sink_dtype: how the model stores the sink K/V ("bf16" | "int8"; default: the profile's kv_dtype).
    """
    tk = token_counts(cfg, width, height)
    name, budget = profile.name, int(profile.vram_budget_gib * GIB)
    if free_vram_bytes is not None and budget > free_vram_bytes:
        fits = math.floor(free_vram_bytes / GIB * 10) / 10
        raise LowvramError(f"profile {name} budgets {profile.vram_budget_gib:.1f} GiB but the GPU has only "
                           f"{free_vram_bytes / GIB:.1f} GiB free; use --set vram_budget_gib={fits} or a smaller profile")
    L, H, D = cfg.num_layers, cfg.num_heads, cfg.head_dim
    if quantized_bytes:
        groups, rest = group_tensor_bytes(cfg, quantized_bytes)
    else:
        blk, inj = block_tensor_bytes(cfg, profile.quant), injector_tensor_bytes(cfg, profile.quant)
        groups = [blk + (inj if i in cfg.audio_inject_layers else []) for i in range(L)]
        rest = 2 * other_params(cfg)
    slab = [sum(align(n) for n in g) for g in groups]
    order = stream_order(L, [i for i in cfg.audio_inject_layers if i < L])
    lq, cap, sink = tk["query"], tk["capacity"], tk["sink"]
    host_kv = profile.kv_placement == "host"
    kv_dt = profile.kv_dtype
    tok_kv = kv_token_bytes(H, D, kv_dt)
    pixels = width * height

    fixed = [PlanItem("DiT non-block params (embeddings, head, audio encoder, frame packer)", "gpu", rest, "bf16"),
             PlanItem(f"sink K/V ({sink} tokens x {L} layers)", "gpu",
                      L * sink * kv_token_bytes(H, D, sink_dtype or kv_dt), sink_dtype or kv_dt)]
    if host_kv:
        fixed.append(PlanItem(f"KV working windows ({KV_SLOTS} layers in flight)", "gpu",
                              kv_workspace_bytes(cap, lq, H, D, kv_dt, KV_SLOTS), "bf16 windows"
                              + (" + int8 staging" if kv_dt == "int8" else "")))
    else:
        fixed.append(PlanItem(f"KV ring caches ({NUM_STEPS} steps x {cap} tokens)", "gpu",
                              NUM_STEPS * L * cap * kv_token_bytes(H, D, "bf16"), "bf16"))
    fixed.append(PlanItem("VAE decoder + time cache", "gpu",
                          int(2 * VAE_DECODER_PARAMS + VAE_CACHE_BYTES_PER_PIXEL * pixels), "bf16"))
    act_dit = forward_activation_bytes(cfg, lq, cap + sink, sink, profile.attention)
    act_vae = int(VAE_ACT_BYTES_PER_PIXEL[profile.vae_decode] * pixels)
    act = PlanItem("activations: max(DiT forward, VAE decode of one latent frame)", "gpu", max(act_dit, act_vae),
                   f"DiT {act_dit / GIB:.2f}, VAE {act_vae / GIB:.2f} ({profile.vae_decode})")
    if profile.quant != "bf16":
        fixed.append(PlanItem("W8A8 transients + fragmentation (measured on H200)", "gpu",
                              W8A8_UNATTRIBUTED_BYTES_PER_QUERY * lq, "tools/bench.py"))
    n_prefetch = profile.prefetch_blocks + 1

    def generate_peak(streamed: set[int]) -> tuple[int, list[PlanItem]]:
        res = [i for i in range(L) if i not in streamed]
        items = [PlanItem(f"DiT blocks resident ({len(res)})", "gpu", sum(slab[i] for i in res), profile.quant)]
        if streamed:
            nb = min(n_prefetch, len(streamed))
            items.append(PlanItem(f"streamed-block buffers ({nb})", "gpu", nb * max(slab[i] for i in streamed),
                                  f"{len(streamed)} blocks stream"))
        items += fixed + [act]
        allocated = sum(it.nbytes for it in items)
        slack = int(ALLOCATOR_SLACK * allocated)
        items.append(PlanItem("CUDA context + allocator slack", "gpu", CONTEXT_BYTES + slack,
                              f"{ALLOCATOR_SLACK:.0%} of allocated"))
        return allocated + CONTEXT_BYTES + slack, items

    # encode phase: umT5 or wav2vec2, before the DiT is placed
    t5 = 0 if profile.t5 == "cpu" else int(2 * T5_EMBED_PARAMS + T5_BYTES_PER_PARAM[profile.t5] * T5_OTHER_PARAMS)
    enc_alloc = max(t5, 2 * WAV2VEC2_PARAMS) + int(0.3 * GIB)  # + activations of either encoder
    encode_peak = int(enc_alloc * (1 + ALLOCATOR_SLACK)) + CONTEXT_BYTES
    if encode_peak > budget:
        smaller = {"bf16": "t5=int8, t5=nf4 or t5=cpu", "int8": "t5=nf4 or t5=cpu", "nf4": "t5=cpu"}
        fix = f"--set {smaller[profile.t5]}" if profile.t5 in smaller else "a larger vram_budget_gib"
        raise LowvramError(f"profile {name}: the encoders (umT5 {profile.t5}) need {encode_peak / GIB:.1f} GiB, over "
                           f"the {profile.vram_budget_gib:.1f} GiB budget; use {fix}")

    if profile.blocks_resident == "auto":
        n_stream = next((k for k in range(L + 1) if generate_peak(set(order[:k]))[0] <= budget), None)
        if n_stream is None:
            need = math.ceil(generate_peak(set(order))[0] / GIB * 10) / 10
            hint = "" if host_kv else ", or --set kv_placement=host kv_dtype=int8"
            raise LowvramError(f"profile {name} at {width}*{height} does not fit {profile.vram_budget_gib:.1f} GiB even "
                               f"with every block streamed; the smallest budget that fits is {need} GiB "
                               f"(--set vram_budget_gib={need}{hint})")
    else:
        if profile.blocks_resident > L:
            raise LowvramError(f"blocks_resident={profile.blocks_resident} but the model has {L} blocks; "
                               f"use --set blocks_resident={L} or auto")
        n_stream = L - profile.blocks_resident
        peak = generate_peak(set(order[:n_stream]))[0]
        if peak > budget:
            most = max((L - k for k in range(L + 1) if generate_peak(set(order[:k]))[0] <= budget), default=None)
            fix = f"--set blocks_resident={most} or auto" if most is not None else "a larger vram_budget_gib"
            raise LowvramError(f"profile {name}: {profile.blocks_resident} resident blocks need {peak / GIB:.1f} GiB, "
                               f"over the {profile.vram_budget_gib:.1f} GiB budget; use {fix}")
    streamed = set(order[:n_stream])
    gen_peak, items = generate_peak(streamed)

    # host memory: KV caches first (their traffic recurs every forward), then streamed slabs, up to the pinned budget
    pin_left = int(profile.pinned_budget_gib * GIB)
    pinned = pageable = pinned_caches = 0
    pinned_blocks = []
    host_items = []
    if host_kv:
        per_cache = L * cap * tok_kv
        for _ in range(NUM_STEPS):
            if per_cache <= pin_left:
                pinned, pin_left, pinned_caches = pinned + per_cache, pin_left - per_cache, pinned_caches + 1
            else:
                pageable += per_cache
        host_items.append(PlanItem(f"KV ring caches ({NUM_STEPS} steps x {cap} tokens)", "host", NUM_STEPS * per_cache,
                                   kv_dt))
    for i in sorted(streamed):
        if slab[i] <= pin_left:
            pinned, pin_left = pinned + slab[i], pin_left - slab[i]
            pinned_blocks.append(i)
        else:
            pageable += slab[i]
    if streamed:
        host_items.append(PlanItem(f"streamed block slabs ({len(streamed)})", "host", sum(slab[i] for i in streamed),
                                   profile.quant))
    if pageable:
        host_items.append(PlanItem("  of which pageable (over pinned_budget_gib)", "host", pageable,
                                   "~5x slower copies"))
    if host_ram_bytes is not None and pinned + pageable + HOST_RESERVE > host_ram_bytes:
        need = math.ceil((pinned + pageable + HOST_RESERVE) / GIB)
        hint = " or --set kv_dtype=int8" if host_kv and kv_dt == "bf16" else ""
        raise LowvramError(f"profile {name} keeps {(pinned + pageable) / GIB:.1f} GiB in host memory (+{HOST_RESERVE // GIB} "
                           f"GiB for the process) but the host has {host_ram_bytes / GIB:.1f} GiB RAM; it needs "
                           f"{need} GiB: use a larger vram budget (fewer streamed blocks){hint}")

    enc_items = [PlanItem(f"umT5 encoder ({profile.t5})", "gpu (encode phase)", t5, "freed before the DiT loads")]
    per_forward_kv = L * (cap - lq) * tok_kv if host_kv else 0
    return Plan(profile=profile, width=width, height=height, tokens=tk,
                resident=tuple(i for i in range(L) if i not in streamed), streamed=tuple(sorted(streamed)),
                n_buffers=min(n_prefetch, len(streamed)), kv_caches=(profile.kv_placement,) * NUM_STEPS,
                kv_dtype=kv_dt, kv_slots=KV_SLOTS if host_kv else 0, block_bytes=tuple(slab),
                demote_order=tuple(order), items=tuple(items + host_items + enc_items),
                encode_peak_bytes=encode_peak, generate_peak_bytes=gen_peak,
                pcie_h2d_bytes=sum(slab[i] for i in streamed) + per_forward_kv,
                pcie_d2h_bytes=L * lq * tok_kv if host_kv else 0,
                host_pinned_bytes=pinned, host_pageable_bytes=pageable, pinned_kv_caches=pinned_caches,
                pinned_blocks=tuple(pinned_blocks), exact_bytes=bool(quantized_bytes), sink_dtype=sink_dtype or kv_dt)
