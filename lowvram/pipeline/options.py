"""What a run is asked to do (`RunOptions`), what it reports (`RunResult`, `BlockEvent`), and the checks
made before any model loads (`check_inputs`, `resolve_device`)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lowvram.constants import AUDIO_RATE, FPS, FRAMES_PER_BLOCK, VIDEO_FRAMES_PER_LATENT
from lowvram.errors import LowvramError


@dataclass
class RunOptions:
    """One video: the model options (ckpt_dir .. vram_cap_gib) and the job (image .. report)."""

    ckpt_dir: Path
    image: Path
    audio: Path
    prompt: str
    lora: Path | None = None
    lora_alpha: float | None = None
    size: str = "704*384"  # a pixel-area budget: the output keeps the image's aspect ratio
    num_clip: int | None = None
    seed: int = 420
    steps: int = 4
    out: Path = Path("output.mp4")
    device: str = "auto"
    dtype: str = "auto"
    online_decode: bool = False
    attention: str | None = None  # overrides the profile's (or the resident preset's) attention
    t5: str | None = None  # overrides the profile's t5 mode
    verify: bool = True
    profile: str | None = None  # None: the resident preset
    overrides: tuple = ()  # `--set` KEY=VALUE strings
    vram_cap_gib: float | None = None  # cap the CUDA allocator (imitate a smaller card)
    report: Path | None = None  # write the RunResult here as JSON
    vae_path: Path | None = None  # the TAEHV weights for vae_decode=tiny (default: taew2_1.* in ckpt_dir)
    partial_out: bool = False  # `out` is already a temporary name the caller renames (jobs): write to it directly

    def plan_overrides(self) -> tuple[str, ...]:
        """`--set` with --attention / --t5 folded in (the flags win over a --set of the same key)."""
        extra = [f"{k}={v}" for k, v in (("attention", self.attention), ("t5", self.t5)) if v is not None]
        return tuple(self.overrides) + tuple(str(e) for e in extra)


@dataclass(frozen=True)
class BlockEvent:
    """Sent after each block is written (progress displays, the web page's preview)."""

    clip: int
    block: int
    blocks_done: int
    blocks_total: int
    frames: int  # written so far
    seconds: float  # since generation began
    peak_vram_bytes: int
    path: str  # the mp4 being written (fragmented: readable while it grows)


@dataclass
class RunResult:
    out: Path
    frames: int
    clips: int
    blocks: int
    seconds: float
    interrupted: bool = False
    peak_vram: int = 0
    phases: list = field(default_factory=list)  # [{name, seconds, peak_allocated, peak_reserved}]
    plan: dict | None = None
    timings: dict = field(default_factory=dict)  # dit_s, vae_s, total_s, setup_s, first_frame_s
    host: dict = field(default_factory=dict)  # peak_rss_bytes, pinned_bytes
    stop_signal: int | None = None  # the signal that stopped an interrupted run (SIGINT, SIGTERM), if any

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"], d["fps"] = str(self.out), round(self.fps, 3)
        return d

    def write_report(self, path) -> None:
        """The result as JSON at `path`, written to a temporary name and renamed (never half-written)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, default=str) + "\n")
        os.replace(tmp, path)


@dataclass
class Inputs:
    """Everything checked before any model loads."""

    image: torch.Tensor  # [3, H, W] in [-1, 1]
    width: int
    height: int
    wave: np.ndarray  # float32 mono at AUDIO_RATE


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise LowvramError(f"--device {device!r} is not a device; use cuda, cuda:N, cpu or auto") from None
    if dev.type not in ("cuda", "cpu"):
        raise LowvramError(f"--device {device!r}: lowvram runs on cuda or cpu; use cuda, cuda:N, cpu or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LowvramError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LowvramError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s); "
                               f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
        dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in table:
        raise LowvramError(f"--dtype {dtype} is not one of auto, {', '.join(table)}")
    return dev, table[dtype]


MAX_STEPS = 8  # each step keeps its own KV ring cache: the planner plans one per step
MAX_SEED = 2**63 - 1


def check_inputs(opts: RunOptions, log=print) -> Inputs:
    """Validate the job's options and read its portrait and voice (one-line LowvramError for bad input).
    Nothing is written: an --out or --report that names an input, or each other, is refused here."""
    from lowvram.io.lora import check_alpha
    from lowvram.io.media import load_audio, load_image, parse_area
    from lowvram.io.paths import refuse_clashing_outputs, refuse_out_as_input
    from lowvram.io.video_writer import check_output_path
    from lowvram.model.attention import CHOICES, check_backend
    from lowvram.runtime.profile import Profile, parse_set

    area = parse_area(opts.size)
    if opts.num_clip is not None and opts.num_clip < 1:
        raise LowvramError(f"--num-clip must be at least 1 (got {opts.num_clip})")
    if not 1 <= opts.steps <= MAX_STEPS:
        raise LowvramError(f"--steps must be between 1 and {MAX_STEPS} (got {opts.steps}); LiveAvatar is distilled "
                           "for 4, and each step keeps its own KV cache")
    if not 0 <= opts.seed <= MAX_SEED:
        raise LowvramError(f"--seed must be between 0 and {MAX_SEED} (got {opts.seed})")
    if opts.attention is not None:
        check_backend(opts.attention, CHOICES)
    sets = parse_set(opts.plan_overrides())  # a bad --set is refused before any work is reported
    if opts.profile not in (None, "auto"):
        Profile.from_name(opts.profile, **sets)
    else:
        Profile.resident(sets.pop("quant", "bf16"), sets.pop("vram_budget_gib", 1.0), **sets)
    check_alpha(opts.lora_alpha)
    inputs = {"--image": opts.image, "--audio": opts.audio, "--ckpt-dir": opts.ckpt_dir, "--lora": opts.lora}
    refuse_out_as_input(opts.out, inputs)
    if opts.report is not None:
        refuse_out_as_input(opts.report, inputs, flag="--report")
        refuse_clashing_outputs({"--out": opts.out, "--report": opts.report})
    check_output_path(str(opts.out))
    image, (w, h) = load_image(str(opts.image), area, log=log)
    block_seconds = FRAMES_PER_BLOCK * VIDEO_FRAMES_PER_LATENT / FPS
    wave = load_audio(str(opts.audio), sr=AUDIO_RATE, min_seconds=block_seconds)
    return Inputs(image, w, h, wave)
