"""Placing the DiT on a device as a plan says: resident blocks on the GPU, the others streamed from
host slabs (with the audio injector that runs after them), each step's KV cache on the GPU or in
host memory, and the OOM fallback that moves one more block to streaming and retries."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowvram.errors import LowvramError
from lowvram.runtime.kv_cache import GpuKV8Cache, GpuKVCache, HostKVCache, KVWorkspace
from lowvram.runtime.offload import BlockStreamer, apply_block_streaming, retry_on_oom
from lowvram.runtime.planner import Plan


@dataclass
class Placement:
    plan: Plan | None
    streamer: BlockStreamer | None
    kv: list  # one cache per denoising step

    def stats(self) -> dict:
        out = {}
        if self.streamer is not None:
            out["blocks"] = self.streamer.stats()
        hosts = [c for c in self.kv if isinstance(c, HostKVCache)]
        if hosts:
            out["kv"] = hosts[0].stats()
        return out

    def reset_stats(self):
        if self.streamer is not None:
            self.streamer.reset_stats()
        for c in self.kv:
            if isinstance(c, HostKVCache):
                c.engine.reset_stats()
                c.ws.wb.reset_stats()


def injector_units(model) -> dict:
    """block index -> the audio-injector modules that run right after it."""
    inj = model.audio_injector
    return {blk: [inj.injector[k], inj.injector_adain_layers[k]] for blk, k in inj.block_to_injector.items()}


def place(model, plan: Plan | None, device, tokens_per_frame: int, kv_frames: int = 12, steps: int = 4,
          dtype=torch.bfloat16) -> Placement:
    """Move the model (loaded on the CPU) to `device` as the plan says and build the step KV caches
    (in the 8-bit kernel's format when model.attention is "triton8").

    Without a plan everything is resident and the caches live on the device."""
    device = torch.device(device)
    cfg = model.cfg
    cap = kv_frames * tokens_per_frame
    eight = getattr(model, "attention", "sdpa") == "triton8"

    def gpu_cache():
        if eight:
            return GpuKV8Cache(cfg.num_layers, cap, 1, cfg.num_heads, cfg.head_dim, device)
        return GpuKVCache(cfg.num_layers, cap, 1, cfg.num_heads, cfg.head_dim, dtype, device)

    if plan is None:
        model.to(device)
        return Placement(None, None, [gpu_cache() for _ in range(steps)])
    if eight and "host" in plan.kv_caches:
        raise LowvramError("attention triton8 reads 8-bit caches on the GPU; the plan keeps them in host memory: "
                           "use --set kv_placement=gpu kv_dtype=bf16 or --set attention=sdpa")
    units = injector_units(model)
    attached = {m for ms in units.values() for m in ms}
    for name, child in model.named_children():
        if name not in ("blocks", "audio_injector"):
            child.to(device)
    for m in model.audio_injector.modules():
        if m not in attached and next(m.parameters(recurse=False), None) is not None:
            m.to(device)
    streamer = apply_block_streaming(model.blocks, plan, device, attached=units) if plan.streamed else None
    if streamer is None:
        model.blocks.to(device)
        for ms in units.values():
            for m in ms:
                m.to(device)
    kv, ws = [], None
    for i, where in enumerate(plan.kv_caches[:steps]):
        if where == "gpu":
            kv.append(gpu_cache())
            continue
        int8 = plan.kv_dtype == "int8"
        if ws is None:
            ws = KVWorkspace(cap, 1, cfg.num_heads, cfg.head_dim, device, plan.kv_slots or 2, int8,
                             max_new=3 * tokens_per_frame)
        kv.append(HostKVCache(cfg.num_layers, cap, 1, cfg.num_heads, cfg.head_dim, plan.kv_dtype, device,
                              workspace=ws, pinned=i < plan.pinned_kv_caches))
    return Placement(plan, streamer, kv)


def guarded(forward, placement: Placement, log=print):
    """Run forward(); on CUDA OOM stream one more block and retry (a LowvramError when none is left)."""
    if placement.streamer is None:
        return forward()
    return retry_on_oom(forward, placement.streamer, log)
