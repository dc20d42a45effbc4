"""`lowvram plan` and `lowvram profiles`: the residency plan without loading any weights.

`plan` reads config.json and, for a quantized directory, the shard headers (exact tensor bytes);
the GPU's free memory and the host RAM are measured when this machine has a CUDA GPU, or given
with --vram-gib / --host-ram-gib to plan for another machine (without either, nothing is checked).
"""

from __future__ import annotations

from pathlib import Path

import click

from lowvram.cli.clickutil import Command
from lowvram.errors import LowvramError
from lowvram.model.config import DiTConfig
from lowvram.runtime.planner import Plan, make_plan
from lowvram.runtime.profile import GIB, Profile, parse_set


def parse_size(size: str) -> tuple[int, int]:
    """'704*384' -> (704, 384)."""
    w, sep, h = size.replace("x", "*").partition("*")
    if not sep or not w.strip().isdigit() or not h.strip().isdigit():
        raise LowvramError(f"--size {size!r}: expected WIDTH*HEIGHT, e.g. 704*384")
    return int(w), int(h)


def checkpoint_bytes(ckpt_dir: Path, quant: str) -> dict[str, int] | None:
    """Tensor name -> bytes from a quantized checkpoint's shard headers; None for a plain (bf16) checkpoint."""
    from lowvram.quantize.format import detect_format
    from lowvram.quantize.shards import tensor_bytes

    info = detect_format(ckpt_dir)
    if info is None:
        return None
    if info.scheme != quant:
        raise LowvramError(f"{ckpt_dir} is quantized as {info.scheme} but the profile uses {quant}; "
                           f"use --set quant={info.scheme} or re-run `lowvram quantize --scheme {quant}`")
    return tensor_bytes(Path(ckpt_dir) / shard for shard in info.shards)


def plan_for_checkpoint(profile_name: str, ckpt_dir, size: str = "704*384", sets=(), vram_gib: float | None = None,
                        host_ram_gib: float | None = None) -> Plan:
    """The plan for a checkpoint directory, measuring this machine unless sizes are given."""
    import psutil
    import torch

    profile = Profile.from_name(profile_name, **parse_set(list(sets)))
    width, height = parse_size(size)
    ckpt_dir = Path(ckpt_dir)
    cfg = DiTConfig.from_json(ckpt_dir / "config.json")
    free = None if vram_gib is None else int(vram_gib * GIB)
    host = None if host_ram_gib is None else int(host_ram_gib * GIB)
    if torch.cuda.is_available():  # planning for this machine: measure what is not given
        free = torch.cuda.mem_get_info()[0] if free is None else free
        host = psutil.virtual_memory().total if host is None else host
    return make_plan(profile, cfg, width, height, free_vram_bytes=free, host_ram_bytes=host,
                     quantized_bytes=checkpoint_bytes(ckpt_dir, profile.quant))


@click.command("plan", cls=Command)
@click.option("--profile", "profile_name", default="auto", show_default=True,
              help="hardware profile (`lowvram profiles` lists them) or auto")
@click.option("--ckpt-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="checkpoint directory with config.json (a quantized one gives exact weight bytes)")
@click.option("--size", default="704*384", show_default=True, help="video WIDTH*HEIGHT")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="override a profile field (repeatable)")
@click.option("--vram-gib", type=float, default=None, help="plan for a GPU with this much free memory (GiB)")
@click.option("--host-ram-gib", type=float, default=None, help="plan for a host with this much RAM (GiB)")
def plan_cmd(profile_name, ckpt_dir, size, sets, vram_gib, host_ram_gib):
    """Print what lives where, the bytes over PCIe per forward and the expected peak VRAM."""
    plan = plan_for_checkpoint(profile_name, ckpt_dir, size, sets, vram_gib, host_ram_gib)
    click.echo(plan.render(), nl=False)


@click.command("profiles", cls=Command)
def profiles_cmd():
    """List the hardware profiles, one line each."""
    for name in Profile.names():
        click.echo(Profile.from_name(name).summary())
    click.echo(f"{'auto':<8} picks one of the above from GPU 0's memory and compute capability")
