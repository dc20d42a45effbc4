"""The `lowvram quantize` command (registered on the main CLI as `quantize.cli.quantize_cmd`)."""

from __future__ import annotations

from pathlib import Path

import click

from lowvram.cli.clickutil import Command
from lowvram.quantize.convert import DEFAULT_SHARD_SIZE, convert


@click.command("quantize", cls=Command)
@click.option("--ckpt-dir", required=True, type=click.Path(path_type=Path),
              help="The bf16 Wan2.2-S2V-14B directory (config.json, index json and shards).")
@click.option("--lora", type=click.Path(path_type=Path), default=None,
              help="LoRA .safetensors to merge before quantizing (liveavatar.safetensors).")
@click.option("--scheme", required=True, help="int8 (W8A8 with INT8 tensor cores) or fp8 (e4m3, sm_89+).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="New output directory.")
@click.option("--keep-bf16", multiple=True, metavar="PATTERN",
              help="Leave modules matching this fnmatch pattern in bf16 (repeatable), e.g. 'blocks.0.*'.")
@click.option("--lora-alpha", type=float, default=None,
              help="LoRA alpha when the file's metadata has none (default 64; scale = alpha / rank).")
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
@click.option("--shard-size", default=DEFAULT_SHARD_SIZE, show_default=True,
              help="Target size of each output shard (e.g. 2GB, 4GB, 500MB).")
@click.option("--device", default="auto", show_default=True,
              help="Where the LoRA merge and the quantization run: cuda, cuda:N, cpu or auto (a CUDA GPU when "
                   "there is one). The GPU's merge may round a few weights one step differently.")
def quantize_cmd(ckpt_dir, lora, scheme, out, keep_bf16, lora_alpha, force, shard_size, device):
    """Merge the LoRA and quantize the DiT's Linear weights to 8 bits, once per checkpoint."""
    convert(ckpt_dir, out, scheme, lora=lora, keep_bf16=keep_bf16, lora_alpha=lora_alpha, force=force,
            shard_size=shard_size, device=device)
