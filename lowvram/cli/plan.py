"""`lowvram plan` and `lowvram profiles`: the residency plan without loading any weights.

`plan` calls the same `plan_run` as `lowvram run` with the same options (profile or the resident preset,
--set, --attention, --t5, --size with the portrait's aspect ratio, --device, --vram-cap-gib), so what it
prints is what the run executes. The machine is measured as `lowvram run` measures it, or described with
--vram-gib / --host-ram-gib to plan for another one; on a machine without a GPU, `--device auto` with a
named profile plans for the card the profile names (CUDA, bf16) without checking anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from lowvram.cli.clickutil import Command
from lowvram.constants import GIB
from lowvram.errors import LowvramError
from lowvram.model.attention import AUTO_HELP as ATTENTION_AUTO_HELP
from lowvram.model.attention import CHOICES as ATTENTION_CHOICES
from lowvram.pipeline.options import MAX_STEPS
from lowvram.runtime.plan import Plan
from lowvram.runtime.profile import Profile

PCIE_4090 = 23e9  # bytes/s, pinned host->GPU on PCIe 4.0 x16 (docs/model.md §9)


def render_plan(plan: Plan, other: Plan | str | None = None) -> str:
    """The plan as a text table (rich, no colour) and its summary lines; `other`: the plan of the other
    schedule (batched vs sequential) for the same options, or why it does not fit, for one comparison line."""
    from rich.console import Console
    from rich.table import Table

    tk = plan.tokens
    title = (f"profile {plan.profile.name} at {plan.width}*{plan.height}: {tk['per_frame']} tokens/frame, "
             f"{tk['query']} query, KV {tk['capacity']} + sink {tk['sink']}")
    table = Table(title=title, title_justify="left")
    for col, just in (("item", "left"), ("where", "left"), ("GiB", "right"), ("note", "left")):
        table.add_column(col, justify=just)
    for it in plan.items:
        table.add_row(it.what, it.where, f"{it.nbytes / GIB:.2f}", it.note)
    console = Console(width=130, record=True, color_system=None, file=_Null())
    console.print(table)
    h2d, d2h = plan.pcie_h2d_bytes, plan.pcie_d2h_bytes
    at = plan.batch if plan.batch > 1 else len(plan.steps)  # the batch this residency is compared at
    lines = [
        f"weights {plan.quant}, attention {plan.attention}, GEMM {plan.gemm}, T5 {plan.t5}, "
        f"KV {plan.kv_caches[0]} {plan.kv_format}, sink {plan.sink_dtype}",
        f"attention {plan.attention}: {plan.attention_why}",
        f"blocks resident: {_ranges(plan.resident) or 'none'}; streamed: {_ranges(plan.streamed) or 'none'} "
        f"({plan.n_buffers} GPU buffers)",
        f"schedule {plan.schedule}: {plan.batch} forward(s) per DiT call, step caches {list(plan.steps)}",
        f"VAE decode {plan.profile.vae_decode}, "
        + ("on its own stream beside the next DiT call" if plan.vae_overlap else "between DiT calls")
        + f" (vae_overlap {plan.profile.vae_overlap})",
        f"CUDA graphs {'on' if plan.cuda_graphs else 'off'} (cuda_graphs {plan.profile.cuda_graphs}): {plan.graphs_why}",
        f"PCIe per forward: {h2d / 1e9:.2f} GB in, {d2h / 1e9:.2f} GB out "
        f"(~{1e3 * (h2d + d2h) / PCIE_4090:.0f} ms at {PCIE_4090 / 1e9:.0f} GB/s); with these blocks resident, "
        f"sequential {plan.pcie_h2d_bytes_at(1) / 1e9:.2f} GB in, batched ({at} per call) "
        f"{plan.pcie_h2d_bytes_at(at) / 1e9:.2f} GB in",
        f"host memory: {plan.host_pinned_bytes / GIB:.1f} GiB pinned, {plan.host_pageable_bytes / GIB:.1f} GiB "
        f"pageable; the run needs {plan.host_bytes / GIB:.1f} GiB of host RAM",
        f"expected peak: {plan.peak_bytes / GIB:.2f} GiB (encode {plan.encode_peak_bytes / GIB:.2f}, generate "
        f"{plan.generate_peak_bytes / GIB:.2f}) of a {plan.profile.vram_budget_gib:.1f} GiB budget"
        + ("" if plan.exact_bytes else "; weights estimated from config.json"),
    ]
    if isinstance(other, Plan):
        lines.append(f"schedule {other.schedule} instead ({other.batch} per call, {len(other.resident)} blocks "
                     f"resident): PCIe per forward {other.pcie_h2d_bytes / 1e9:.2f} GB in, expected peak "
                     f"{other.peak_bytes / GIB:.2f} GiB")
    elif other:
        lines.append(f"schedule {'sequential' if plan.schedule == 'batched' else 'batched'} instead: {other}")
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


@click.command("plan", cls=Command)
@click.option("--profile", "profile_name", default=None,
              help="Hardware profile (`lowvram profiles` lists them) or auto. Default: everything resident, "
                   "as `lowvram run` without --profile.")
@click.option("--ckpt-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Checkpoint directory (a quantized one gives its scheme and exact weight bytes).")
@click.option("--size", default="704*384", show_default=True,
              help="Pixel-area budget W*H, as for `lowvram run`; the output keeps the portrait's aspect ratio "
                   "(--image), else W:H.")
@click.option("--image", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The portrait, for its aspect ratio.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a profile field (repeatable).")
@click.option("--attention", type=click.Choice(ATTENTION_CHOICES), default=None,
              help="Self-attention backend; " + ATTENTION_AUTO_HELP)
@click.option("--t5", type=click.Choice(["bf16", "int8", "nf4", "cpu"]), default=None, help="Text-encoder mode.")
@click.option("--device", default="auto", show_default=True, help="cuda, cuda:N, cpu or auto.")
@click.option("--dtype", default="auto", show_default=True, help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32.")
@click.option("--vram-cap-gib", type=float, default=None, help="Plan for the allocator cap `lowvram run` would use.")
@click.option("--vram-gib", type=float, default=None, help="Plan for a GPU with this much free memory (GiB).")
@click.option("--host-ram-gib", type=float, default=None, help="Plan for a host with this much available RAM (GiB).")
@click.option("--steps", type=click.IntRange(1, MAX_STEPS), default=4, show_default=True,
              help="Euler steps per block, as for `lowvram run` (one KV cache each).")
@click.option("--gpus", type=click.IntRange(1), default=None,
              help="Plan `lowvram run --gpus N`: which rank does what, each rank planned against its own card.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_cmd(profile_name, ckpt_dir, size, image, sets, attention, t5, device, dtype, vram_cap_gib, vram_gib,
             host_ram_gib, steps, gpus, as_json):
    """Print what lives where, the bytes over PCIe per forward and the expected peak VRAM."""
    from lowvram.pipeline.options import RunOptions, resolve_device
    from lowvram.runtime.machine import Machine
    from lowvram.runtime.plan import plan_run

    opts = RunOptions(ckpt_dir=ckpt_dir, image=image, audio=None, prompt="", size=size, device=device, dtype=dtype,
                      attention=attention, t5=t5, profile=profile_name, overrides=tuple(sets),
                      vram_cap_gib=vram_cap_gib, steps=steps)
    if device == "auto" and not torch.cuda.is_available() and profile_name not in (None, "auto"):
        # no GPU here: plan for the card the profile names, as it would run there (CUDA, bf16)
        dev, dt = torch.device("cuda"), torch.bfloat16 if dtype == "auto" else resolve_device("cpu", dtype)[1]
        machine = Machine.described(vram_gib, host_ram_gib)
    else:
        dev, dt = resolve_device(device, dtype)
        if vram_gib is not None or host_ram_gib is not None:
            machine = Machine.described(vram_gib, host_ram_gib, dev.type)
        else:
            machine = Machine.detect(dev, vram_cap_gib)
    if gpus is not None and gpus > 1:
        return _plan_gpus(opts, gpus, machine, dev, dt, vram_gib is not None or host_ram_gib is not None, as_json)
    plan = plan_run(ckpt_dir, profile_name, opts.plan_overrides(), size, image, machine, dev, dt, steps)
    if as_json:
        click.echo(json.dumps(plan.to_dict(), indent=1))
        return
    swap = "sequential" if plan.schedule == "batched" else "batched"  # the comparison line
    # (graphs "on" would refuse the sequential schedule, which the line compares for its memory and PCIe only)
    graphs = ("cuda_graphs=auto",) if plan.profile.cuda_graphs == "on" else ()
    try:
        other = plan_run(ckpt_dir, profile_name, opts.plan_overrides() + (f"schedule={swap}", *graphs), size, image,
                         machine, dev, dt, steps)
    except LowvramError as e:
        other = str(e)
    click.echo(render_plan(plan, other), nl=False)


def _plan_gpus(opts, gpus: int, machine, dev, dt, described: bool, as_json: bool) -> None:
    """`lowvram plan --gpus N`: the role table, then every rank's plan against its own card."""
    from lowvram.errors import LowvramError
    from lowvram.parallel.plans import plan_ranks
    from lowvram.parallel.roles import Pipeline
    from lowvram.runtime.machine import Machine

    pipe = Pipeline.of(gpus, opts.steps)
    measured = dev.type == "cuda" and torch.cuda.is_available() and not described
    if measured and torch.cuda.device_count() < gpus:
        raise LowvramError(f"--gpus {gpus} asks for {gpus} GPUs but this machine has {torch.cuda.device_count()} "
                           f"visible; use --gpus {torch.cuda.device_count()} or fewer, or --vram-gib to plan for "
                           "another machine")

    def machine_for(rank: int):
        return Machine.detect(torch.device("cuda", rank), opts.vram_cap_gib) if measured else machine

    plans = plan_ranks(opts, pipe, machine_for, dev, dt)
    if as_json:
        click.echo(json.dumps({"gpus": gpus, "ranks": [rp.to_dict() for rp in plans]}, indent=1, default=str))
        return
    click.echo(f"{gpus} ranks, {opts.steps} denoising steps (timestep-forcing pipeline):")
    for rp in plans:
        click.echo(f"rank {rp.role.rank} ({rp.device}): {rp.role.describe()}")
        click.echo(f"  {rp.plan.headline()}")
        if rp.kv_note:
            click.echo(f"  {rp.kv_note}")


@click.command("profiles", cls=Command)
def profiles_cmd():
    """List the hardware profiles, one line each."""
    from lowvram.runtime.planner import kv_format_of, resolve_attention

    for name in Profile.names():
        prof = Profile.from_name(name)
        attention, _ = resolve_attention(prof)  # "auto" as on the profile's own card
        click.echo(prof.summary(str(attention), str(kv_format_of(prof, attention))))
    click.echo(f"{'auto':<8} picks one of the above from GPU 0's memory and compute capability")
