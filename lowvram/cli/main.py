"""The `lowvram` command line: a thin layer whose commands each call one library function.

User mistakes raise `LowvramError`; `main` prints them as one line and exits with code 2.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path

import click

# lowvram draws its own progress; the Hugging Face loaders' bars (wav2vec2, tokenizer) would interleave with it
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from lowvram.cli.clickutil import Group
from lowvram.model.attention import AUTO_HELP as ATTENTION_AUTO_HELP
from lowvram.model.attention import CHOICES as ATTENTION_CHOICES
from lowvram.pipeline.options import MAX_SEED, MAX_STEPS

DEFAULT_CKPT = "ckpt/Wan2.2-S2V-14B"
DEFAULT_LORA = "ckpt/LiveAvatar/liveavatar.safetensors"


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lowvram")
def cli():
    """Live Avatar (Wan2.2-S2V-14B + LiveAvatar LoRA) on a 24 GB card."""


INTERRUPTED_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}  # the shells' 128 + signal number


def _run(opts, quiet: bool, gpus: int | None = None):
    """Run one video; a run stopped by Ctrl-C or SIGTERM exits 130 / 143 after its last line says what is kept.
    gpus > 1 (or a rank started by torchrun): the timestep-forcing pipeline (lowvram.parallel)."""
    from lowvram.cli.progress import make_progress
    from lowvram.constants import FPS
    from lowvram.parallel import in_world, run_parallel
    from lowvram.pipeline.run import run

    log = (lambda *a: None) if quiet else (lambda *a: click.echo(" ".join(map(str, a)), err=True))
    if (gpus is not None and gpus > 1) or in_world():
        res = run_parallel(opts, gpus, progress=None if quiet else make_progress(), log=log)
        if res is None:  # a rank of a torchrun group that does not write: the writer rank reports
            return None
    else:
        res = run(opts, progress=None if quiet else make_progress(), log=log)
    peak = f", peak VRAM {res.peak_vram / 2**30:.1f} GiB" if res.peak_vram else ""
    if res.interrupted:
        click.echo(f"interrupted: {res.out} holds the first {res.frames} frames ({res.frames / FPS:.1f} s, "
                   f"{res.blocks} of {res.clips * 4} blocks), complete and playable")
        sys.exit(INTERRUPTED_EXIT.get(res.stop_signal, 130))
    click.echo(f"wrote {res.out}: {res.frames} frames ({res.blocks} blocks) in {res.seconds:.1f} s, "
               f"{res.fps:.2f} generated FPS{peak}")
    return res


@cli.command()
@click.option("--ckpt-dir", type=click.Path(path_type=Path), default=DEFAULT_CKPT, show_default=True,
              help="Wan2.2-S2V-14B directory, or one written by `lowvram quantize`.")
@click.option("--lora", type=click.Path(path_type=Path), default=DEFAULT_LORA, show_default=True,
              help="LiveAvatar LoRA (.safetensors); merged at load. Ignored for quantized directories.")
@click.option("--lora-alpha", type=float, default=None, help="LoRA alpha when the file's metadata has none (default 64).")
@click.option("--image", type=click.Path(path_type=Path), required=True, help="Reference portrait (any image Pillow opens).")
@click.option("--audio", type=click.Path(path_type=Path), required=True, help="Voice recording (wav, mp3, m4a, flac, ogg).")
@click.option("--prompt", required=True, help="Text prompt describing the scene.")
@click.option("--size", default="704*384", show_default=True,
              help="Pixel-area budget W*H; the output keeps the image's aspect ratio, padded to multiples of 64.")
@click.option("--num-clip", type=click.IntRange(1), default=None,
              help="At most this many 48-frame clips (default: as long as the audio).")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=420, show_default=True,
              help="Seed of the noise and of the rolling-sink shift.")
@click.option("--steps", type=click.IntRange(1, MAX_STEPS), default=4, show_default=True,
              help="Euler steps per block (the LoRA is distilled for 4; each step keeps its own KV cache).")
@click.option("--out", type=click.Path(path_type=Path), default="output.mp4", show_default=True, help="Output mp4.")
@click.option("--device", default="auto", show_default=True, help="cuda, cuda:N, cpu or auto.")
@click.option("--dtype", default="auto", show_default=True, help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32.")
@click.option("--attention", type=click.Choice(ATTENTION_CHOICES), default=None,
              help="Self-attention backend (default: the profile's; sdpa without a profile); " + ATTENTION_AUTO_HELP)
@click.option("--t5", type=click.Choice(["bf16", "int8", "nf4", "cpu"]), default=None,
              help="Text-encoder mode (default: the profile's; bf16 without a profile): bf16, or int8 (LLM.int8) / "
                   "nf4 through bitsandbytes, which run on CUDA and on the CPU (bitsandbytes >= 0.50); cpu runs "
                   "the bf16 encoder on the CPU.")
@click.option("--online-decode", is_flag=True, help="Refresh the sink from clip 0's output at clip 1, as the reference.")
@click.option("--no-verify", is_flag=True,
              help="Skip hashing the shards of a quantized directory (a shard that hashed right before and is "
                   "unchanged since, by size, mtime and inode, is not hashed again anyway).")
@click.option("--profile", default=None,
              help="Hardware profile (4090, 3090, 16gb, 12gb, a100-80, h100-80, auto): plans residency, KV placement, "
                   "attention and T5 mode; see `lowvram profiles`. Default: everything resident.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a field of the profile (or of the all-resident preset); repeatable.")
@click.option("--vae", "vae_decode", type=click.Choice(["frame", "fast", "lean", "tiny"]), default=None,
              help="VAE decode: frame (the reference's bits), fast (channels-last, fused norm, CUDA graphs; the GPU "
                   "profiles' default; lean where its memory would cost speed elsewhere), lean (fast without the "
                   "graphs: less memory) or tiny (TAEHV drafts: taew2_1.pth in --ckpt-dir or --vae-path).")
@click.option("--vae-path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The TAEHV weights for --vae tiny (default: taew2_1.safetensors/.pth in --ckpt-dir).")
@click.option("--vram-cap-gib", type=float, default=None,
              help="Cap the CUDA allocator at this many GiB to imitate a smaller card (also LOWVRAM_VRAM_CAP_GIB).")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the result (plan, phases with time and peak VRAM, frames) as JSON here.")
@click.option("--gpus", type=click.IntRange(1), default=None,
              help="Timestep-forcing pipeline over N GPUs (2-5; 4+: one denoising step per GPU, a 5th decodes and "
                   "writes). Starts its own processes (also runs under torchrun); with --device cpu the ranks are "
                   "CPU processes. See `lowvram plan --gpus N`.")
@click.option("--quiet", is_flag=True, help="No progress display.")
def run(ckpt_dir, lora, lora_alpha, image, audio, prompt, size, num_clip, seed, steps, out, device, dtype,
        attention, t5, online_decode, no_verify, profile, overrides, vae_decode, vae_path, vram_cap_gib, report,
        gpus, quiet):
    """Portrait + voice + prompt -> a talking-avatar mp4, written block by block."""
    from lowvram.pipeline.options import RunOptions

    _run(RunOptions(ckpt_dir=ckpt_dir, image=image, audio=audio, prompt=prompt, lora=lora, lora_alpha=lora_alpha,
                    size=size, num_clip=num_clip, seed=seed, steps=steps, out=out, device=device, dtype=dtype,
                    online_decode=online_decode, attention=attention, t5=t5, verify=not no_verify,
                    profile=profile, overrides=tuple(overrides) + ((f"vae_decode={vae_decode}",) if vae_decode else ()),
                    vram_cap_gib=vram_cap_gib, report=report, vae_path=vae_path), quiet, gpus)


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default="demo.mp4", show_default=True, help="Output mp4.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Keep the tiny checkpoint and inputs here (default: a temporary directory).")
@click.option("--seconds", type=click.FloatRange(0.5, 600.0), default=2.0, show_default=True,
              help="Length of the synthetic voice, 0.5 to 600 s.")
@click.option("--quiet", is_flag=True, help="No progress display.")
def demo(out, workdir, seconds, quiet):
    """The whole pipeline on the embedded tiny checkpoint (random weights) on the CPU: demo.mp4."""
    from lowvram.demo.inputs import synth_portrait, synth_voice
    from lowvram.demo.tiny import write_tiny_checkpoint
    from lowvram.demo.workdir import clean_stale_demo_dirs, demo_workdir
    from lowvram.errors import LowvramError
    from lowvram.io.paths import refuse_out_as_input
    from lowvram.pipeline.options import RunOptions

    if not math.isfinite(seconds):
        raise LowvramError(f"--seconds {seconds} is not a number of seconds; use e.g. --seconds 2")
    if workdir is not None:
        refuse_out_as_input(out, {"--workdir": workdir})
    removed = clean_stale_demo_dirs()
    if removed:
        click.echo(f"removed {len(removed)} folder(s) left by killed demos", err=True)
    t0 = time.perf_counter()
    with demo_workdir() as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        ckpt, lora = write_tiny_checkpoint(root)
        synth_portrait(str(root / "portrait.png"), width=256, height=320)
        synth_voice(str(root / "voice.wav"), seconds=seconds)
        _run(RunOptions(ckpt_dir=ckpt, lora=lora, image=root / "portrait.png", audio=root / "voice.wav",
                        prompt="A person talking to the camera, natural light.", size="256*320", out=out,
                        device="cpu"), quiet)
    click.echo(f"demo done in {time.perf_counter() - t0:.1f} s (random tiny weights: expect noise, not a face)")


@cli.command()
@click.option("--ckpt-dir", type=click.Path(path_type=Path), default=None, help="Also check this checkpoint directory.")
def doctor(ckpt_dir):
    """Versions, GPUs, host RAM, pinned-memory limit and (with --ckpt-dir) the checkpoint files.

    Exits 1 when it finds a problem (a run would fail or be wrong), 0 when there are only warnings."""
    from lowvram.cli.doctor import doctor_report

    report = doctor_report(ckpt_dir)
    for line in report.lines():
        click.echo(line)
    sys.exit(report.exit_code)


def _register():
    """Commands that live beside their library code."""
    from lowvram.cli.batch import batch_cmd
    from lowvram.cli.plan import plan_cmd, profiles_cmd
    from lowvram.cli.ui import ui_cmd
    from lowvram.quantize.cli import quantize_cmd

    cli.add_command(quantize_cmd, "quantize")
    cli.add_command(plan_cmd, "plan")
    cli.add_command(profiles_cmd, "profiles")
    cli.add_command(batch_cmd, "batch")
    cli.add_command(ui_cmd, "ui")


_register()


def main(argv=None):
    return cli.main(args=argv, prog_name="lowvram")


if __name__ == "__main__":
    sys.exit(main())
