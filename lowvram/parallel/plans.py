"""Every rank's plan, made against its own card (`lowvram plan --gpus N` prints them; each rank of
`lowvram run --gpus N` makes its own before any weights load).

A DiT rank is planned by the same `plan_run` as a single-GPU run, holding only its steps' caches, the
VAE decoder only if it writes and the encoders only if it encodes (lowvram.parallel.roles). The host's
RAM is shared by the ranks on it, so each plans against its share.

Where a rank's step cache lives: with a named profile whose caches live on the host (4090, 3090, 16gb,
12gb), the rank is planned twice, as the profile says and with its cache on the GPU in 8 bits (the
triton8 kernel's format); the GPU variant is taken when it fits the budget and moves no more bytes over
PCIe per forward than the host variant (a GPU cache that only fits by streaming more blocks saves
nothing). An explicit --set kv_placement / kv_dtype / attention is never second-guessed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lowvram.constants import GIB
from lowvram.errors import LowvramError
from lowvram.parallel.roles import Role
from lowvram.runtime.plan import Plan, PlanItem

GPU_KV = ("kv_placement=gpu", "kv_dtype=bf16", "attention=triton8")
USER_KV_KEYS = ("kv_placement", "kv_dtype", "attention")


@dataclass(frozen=True)
class DecodePlan:
    """The VAE rank: the decoder and its time cache, one latent frame's activations, the CUDA context."""

    profile: str
    vae_decode: str  # frame | fast | lean | tiny (lowvram.runtime.decode.make_decoder)
    width: int
    height: int
    items: tuple[PlanItem, ...]
    budget_bytes: int

    @property
    def peak_bytes(self) -> int:
        return sum(it.nbytes for it in self.items)

    def headline(self) -> str:
        return f"VAE decode ({self.vae_decode}) + mp4 writer, expected peak {self.peak_bytes / GIB:.1f} GiB"

    def to_dict(self) -> dict:
        return {**asdict(self), "peak_bytes": self.peak_bytes, "kind": "decode"}


@dataclass(frozen=True)
class RankPlan:
    role: Role
    device: str
    plan: Plan | DecodePlan
    kv_note: str = ""

    def to_dict(self) -> dict:
        plan = self.plan.to_dict()
        return {"rank": self.role.rank, "device": self.device, "role": self.role.describe(),
                "steps": list(self.role.steps), "writes": self.role.writes, "encodes": self.role.encodes,
                "headline": self.plan.headline(), "kv_note": self.kv_note, "plan": plan}


def plan_rank(opts, role: Role, machine, device: torch.device, dtype: torch.dtype, ranks_on_host: int) -> RankPlan:
    """The plan of one rank of `opts` (a RunOptions) on `machine` (its own card, measured or described)."""
    if machine.host_ram_bytes is not None and ranks_on_host > 1:
        machine = replace(machine, host_ram_bytes=machine.host_ram_bytes // ranks_on_host)
    where = f"cuda:{role.rank}" if device.type == "cuda" else "cpu"
    try:
        if not role.steps:
            return RankPlan(role, where, decode_plan(opts, machine, device, dtype))
        plan, note = _dit_plan(opts, role, machine, device, dtype)
        return RankPlan(role, where, plan, note)
    except LowvramError as e:
        raise LowvramError(f"rank {role.rank} ({where}, {role.describe()}): {e}") from None


def _plan(opts, role: Role, machine, device, dtype, extra=()) -> Plan:
    from lowvram.runtime.plan import plan_run

    image = Path(opts.image) if opts.image is not None else None
    # a rank decodes between its ticks (rank.py's BlockWriter), never beside them: no overlapped decode planned
    return plan_run(opts.ckpt_dir, opts.profile, opts.plan_overrides() + tuple(extra) + ("vae_overlap=off",),
                    opts.size, image, machine,
                    device, dtype, steps=opts.steps, held=role.steps, decode=role.writes, encode=role.encodes)


def pcie_bytes(plan: Plan) -> int:
    return plan.pcie_h2d_bytes + plan.pcie_d2h_bytes


def _dit_plan(opts, role: Role, machine, device, dtype) -> tuple[Plan, str]:
    base = _plan(opts, role, machine, device, dtype)
    user = {s.partition("=")[0].strip() for s in opts.plan_overrides()}
    if device.type != "cuda" or opts.profile is None or base.kv_caches[0] != "host" or user & set(USER_KV_KEYS):
        return base, ""
    host = f"host {base.kv_format} ({pcie_bytes(base) / 1e9:.2f} GB/forward over PCIe)"
    try:
        gpu = _plan(opts, role, machine, device, dtype, GPU_KV)
    except LowvramError:
        return base, f"step cache on the {host}: on the GPU in 8 bits it does not fit the budget"
    if pcie_bytes(gpu) <= pcie_bytes(base):
        return gpu, (f"step cache on the GPU in 8 bits ({pcie_bytes(gpu) / 1e9:.2f} GB/forward over PCIe, "
                     f"{len(gpu.streamed)} blocks streamed) rather than on the {host}")
    return base, (f"step cache on the {host}: on the GPU in 8 bits it fits only with {len(gpu.streamed)} blocks "
                  f"streamed, {pcie_bytes(gpu) / 1e9:.2f} GB/forward")


def decode_plan(opts, machine, device: torch.device, dtype: torch.dtype) -> DecodePlan:
    """The VAE rank's plan; raises if it does not fit the profile's budget (or the card)."""
    from lowvram.runtime.plan import PlanSource, component_sizes, resolve_size
    from lowvram.runtime.planner import ALLOCATOR_SLACK, CONTEXT_BYTES, vae_activation_bytes, vae_decoder_item
    from lowvram.runtime.profile import Profile, parse_set

    ov = parse_set(list(opts.plan_overrides()))
    ov.pop("quant", None)
    if opts.profile is None:  # as plan_run: the resident preset decodes with the fast path on a GPU
        ov = {"vae_decode": "fast", **ov} if device.type == "cuda" else ov
        prof = Profile.resident("bf16", machine.resident_budget_gib(), **ov)
    else:
        prof = Profile.from_name(opts.profile, device=device if device.type == "cuda" else None, **ov)
    budget = int(prof.vram_budget_gib * GIB)
    if machine.free_vram_bytes is not None and budget > machine.free_vram_bytes:
        raise LowvramError(f"profile {prof.name} budgets {prof.vram_budget_gib:.1f} GiB but the GPU has only "
                           f"{machine.free_vram_bytes / GIB:.1f} GiB free; use --set vram_budget_gib="
                           f"{int(machine.free_vram_bytes / GIB * 10) / 10} or a smaller profile")
    w, h = resolve_size(opts.size, Path(opts.image) if opts.image is not None else None)
    sizes = component_sizes(PlanSource.of(opts.ckpt_dir), dtype)
    dec = vae_decoder_item(sizes, w, h)
    act = vae_activation_bytes(sizes, prof.vae_decode, w, h)
    items = [dec, PlanItem("activations: VAE decode of one latent frame", "gpu", act, prof.vae_decode)]
    slack = int(ALLOCATOR_SLACK * (dec.nbytes + act))
    items.append(PlanItem("CUDA context + allocator slack", "gpu", CONTEXT_BYTES + slack,
                          f"{ALLOCATOR_SLACK:.0%} of allocated"))
    plan = DecodePlan(prof.name, prof.vae_decode, w, h, tuple(items), budget)
    if plan.peak_bytes > budget:
        raise LowvramError(f"the VAE decode needs {plan.peak_bytes / GIB:.1f} GiB at {w}*{h}, over the "
                           f"{prof.vram_budget_gib:.1f} GiB budget; use a smaller --size")
    return plan


def plan_ranks(opts, pipeline, machine_for, device: torch.device, dtype: torch.dtype) -> list[RankPlan]:
    """Every rank's plan; machine_for(rank) -> that rank's Machine."""
    return [plan_rank(opts, r, machine_for(r.rank), device, dtype, pipeline.world) for r in pipeline.roles]
