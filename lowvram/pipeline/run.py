"""`lowvram run`: portrait + voice + prompt -> mp4, generated and written block by block.

Order of work (each model is freed before the next is needed): inputs validated -> prompt
embedding (disk cache, else umT5) -> wav2vec2 features -> VAE encode of ref/motion latents ->
DiT -> sink prefill -> per clip 4 blocks x `steps` Euler steps -> each finished block decoded by
the streaming VAE and written to the mp4 at once.

A/V sync: the reference drops the first 3 generated frames but muxes audio from t = 0, so its
video leads its audio by 120 ms. Generated frame k is driven by the audio at k/25 s, so we drop
the first 3 frames *and* the first 120 ms of audio: video frame 0 and audio t = 0 line up.
"""

from __future__ import annotations

import gc
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lowvram.constants import AUDIO_RATE, FPS, MOTION_FRAMES
from lowvram.errors import LowvramError
from lowvram.io import prompt_cache
from lowvram.runtime.schedule import (
    CLIP_FRAMES,
    DROPPED_FRAMES,
    FRAMES_PER_BLOCK,
    LATENT_FRAMES,
    BlockIndex,
    euler_step,
    flow_sigmas,
    model_timesteps,
    output_frames,
)

REF_REPEAT = 5           # the single-GPU reference encodes the ref image repeated 5 times


@dataclass
class RunOptions:
    ckpt_dir: Path
    image: Path
    audio: Path
    prompt: str
    lora: Path | None = None
    lora_alpha: float | None = None
    size: str = "704*384"
    num_clip: int | None = None
    seed: int = 420
    steps: int = 4
    out: Path = Path("output.mp4")
    device: str = "auto"
    dtype: str = "auto"
    online_decode: bool = False
    attention: str = "sdpa"
    t5: str = "bf16"
    verify: bool = True
    profile: str | None = None
    overrides: tuple = ()


@dataclass
class RunResult:
    out: Path
    frames: int
    clips: int
    blocks: int
    seconds: float
    interrupted: bool = False
    peak_vram: int = 0
    timings: dict = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LowvramError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in table:
        raise LowvramError(f"--dtype {dtype} is not one of auto, {', '.join(table)}")
    return dev, table[dtype]


class StopFlag:
    """SIGINT/SIGTERM set a flag; generation stops after the block in flight is written."""

    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame):
        self.stop = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _free():
    """Return the memory of models the caller has just dropped (`del`) to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Inputs:
    """Everything checked before any model loads."""

    image: torch.Tensor   # [3, H, W] in [-1, 1]
    width: int
    height: int
    wave: "object"        # np.ndarray float32 mono 16 kHz


def check_inputs(opts: RunOptions) -> Inputs:
    from lowvram.io.media import load_audio, load_image, parse_size
    from lowvram.io.video_writer import check_output_path

    area = parse_size(opts.size)
    if opts.num_clip is not None and opts.num_clip < 1:
        raise LowvramError(f"--num-clip must be at least 1 (got {opts.num_clip})")
    if opts.steps < 1 or opts.steps > 50:
        raise LowvramError(f"--steps must be between 1 and 50 (got {opts.steps}); LiveAvatar is distilled for 4")
    from lowvram.model.attention import check_backend

    check_backend(opts.attention)
    check_output_path(str(opts.out))
    image, (w, h) = load_image(str(opts.image), area)
    block_seconds = FRAMES_PER_BLOCK * 4 / FPS
    wave = load_audio(str(opts.audio), sr=AUDIO_RATE, min_seconds=block_seconds)
    return Inputs(image, w, h, wave)


def encode_prompt(ckpt, prompt: str, device, dtype, t5_mode: str, log=print) -> torch.Tensor:
    """[L, text_dim] umT5 embedding of the prompt, from the disk cache when it is there."""
    key = prompt_cache.prompt_key(prompt, ckpt.t5, t5_mode)
    ctx = prompt_cache.load(key)
    if ctx is not None:
        log("prompt embedding: from cache (T5 not loaded)")
        return ctx
    from lowvram.model.text_encoder import load_text_encoder

    t5_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    enc = load_text_encoder(ckpt.root, device=device, dtype=t5_dtype, quant=t5_mode)
    ctx = enc.encode([prompt])[0].float().cpu()
    del enc  # the quantized encoder goes before a bf16 one may load for the cosine
    _free()
    if t5_mode != "bf16":
        report_t5_cosine(ckpt, prompt, ctx, device, t5_dtype, t5_mode, log)
    prompt_cache.store(key, ctx)
    return ctx


def report_t5_cosine(ckpt, prompt, ctx, device, dtype, t5_mode, log=print):
    """Once per T5 file and mode: the cosine of the 8/4-bit embedding against bf16, computed with the bf16
    encoder after the quantized one is freed (the same encode-phase memory as a bf16 run)."""
    from lowvram.model.text_encoder import embedding_cosine, load_text_encoder

    marker = prompt_cache.cache_dir() / f"t5-cosine-{prompt_cache.prompt_key('', ckpt.t5, t5_mode)}.txt"
    if marker.is_file():
        return
    enc = load_text_encoder(ckpt.root, device=device, dtype=dtype, quant="bf16")
    ref = enc.encode([prompt])[0].float().cpu()
    del enc
    _free()
    cos = embedding_cosine([ctx], [ref])
    log(f"umT5 {t5_mode}: embedding cosine against bf16 {cos:.4f} (printed once for this T5 file)")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{cos:.6f}\n")


def encode_audio(ckpt, wave, device, num_clip: int | None):
    """wav2vec2 features per clip (lowvram.pipeline.audio_features) and the number of clips to generate."""
    from lowvram.model.audio_encoder import load_audio_encoder
    from lowvram.pipeline.audio_features import ClipAudio

    def encoder(device=device):
        return load_audio_encoder(ckpt.root, device=device,
                                  dtype=torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)

    feats = ClipAudio(encoder, wave, device, video_fps=FPS, clip_frames=CLIP_FRAMES)
    _free()  # the whole-file encoder is gone; a windowed one waits on the CPU
    return feats, feats.num_clips if num_clip is None else min(feats.num_clips, num_clip)


class _AllClips:
    """Features of every frame already in one tensor [1, L+1, D, N] (benchmarks, tests)."""

    def __init__(self, feats):
        self.feats = feats

    def clip(self, r: int):
        return self.feats[..., r * CLIP_FRAMES:(r + 1) * CLIP_FRAMES]


def encode_conditioning(vae, image: torch.Tensor):
    """ref latent [1,16,1,h,w] (the 5x-repeat trick) and the last 19 motion latents [1,16,19,h,w]."""
    from lowvram.model.vae import encode_repeated

    frame = image[None, :, None].to(vae.dtype)                                  # [1, 3, 1, H, W]
    ref = vae.encode(frame.expand(-1, -1, REF_REPEAT, -1, -1))[:, :, 1:2]
    motion = encode_repeated(vae, frame, REF_REPEAT * MOTION_FRAMES)
    return ref, motion[:, :, -((MOTION_FRAMES + 3) // 4):]


def make_run_plan(opts: RunOptions, ckpt, inputs: Inputs, device, log=print):
    """(profile, plan) for --profile, or (None, None): everything resident on the device."""
    if opts.profile is None:
        return None, None
    import psutil

    from lowvram.quantize.format import detect_format
    from lowvram.runtime.planner import make_plan
    from lowvram.runtime.profile import Profile, parse_set

    profile = Profile.from_name(opts.profile, **parse_set(list(opts.overrides)))
    info = detect_format(ckpt.root)
    if info is None and profile.quant != "bf16":
        raise LowvramError(f"profile {profile.name} runs {profile.quant} weights but {ckpt.root} is the bf16 checkpoint; "
                           f"convert it once with `lowvram quantize --ckpt-dir {ckpt.root} --scheme {profile.quant} "
                           f"--out <dir>` and pass --ckpt-dir <dir>, or add --set quant=bf16")
    if info is not None and info.scheme != profile.quant:
        log(f"profile {profile.name} expects {profile.quant}; the checkpoint is {info.scheme}, planning for that")
        profile = Profile.from_name(opts.profile, **{**parse_set(list(opts.overrides)), "quant": info.scheme})
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    plan = make_plan(profile, ckpt.dit_config(), inputs.width, inputs.height, free_vram_bytes=free,
                     host_ram_bytes=psutil.virtual_memory().available,
                     quantized_bytes=ckpt.tensor_bytes() if info is not None else None)
    return profile, plan


class Generator:
    """The streaming loop over clips and blocks; owns the sink, the step caches and the decoder."""

    def __init__(self, model, vae, context, audio_feats, ref, motion, steps: int, seed: int,
                 device, dtype, kv_caches=None, guard=None, sink_dtype: str = "bf16"):
        from lowvram.model.vae import StreamingDecoder

        self.model, self.vae, self.device, self.dtype = model, vae, device, dtype
        self.context = model.embed_text([context])
        self.audio = audio_feats if hasattr(audio_feats, "clip") else _AllClips(audio_feats)
        self.sigmas = flow_sigmas(steps)
        self.t = model_timesteps(self.sigmas)
        self.seed = seed
        self.ref_shift_rng = random.Random(seed)  # the reference draws d = randint(4, 30) unseeded
        self.h, self.w = ref.shape[-2:]
        self.tokens_per_frame = (self.h // model.cfg.patch_size[1]) * (self.w // model.cfg.patch_size[2])
        self.sink_dtype = sink_dtype  # "int8": the sink K/V kept as INT8 (half the memory), dequantized per layer
        self.sink = self._prefill(ref, motion)
        if kv_caches is None:
            from lowvram.runtime.engine import place

            kv_caches = place(model, None, device, self.tokens_per_frame, dtype=dtype).kv
        self.kv = kv_caches
        self.decoder = StreamingDecoder(vae)
        self.decoder.decode(motion[:, :, :7].to(vae.dtype))  # warm the decoder cache, as the reference's VAE rank
        self.noise = None
        self.guard = guard or (lambda f: f())

    def _prefill(self, ref, motion):
        return self.model.prefill_sink(ref.to(self.device, self.dtype), motion.to(self.device, self.dtype),
                                       self.context, int8=self.sink_dtype == "int8")

    def refresh_sink(self, ref, motion):
        self.sink = None  # the old sink's memory is free before the new one is built
        self.sink = self._prefill(ref, motion)

    def block_audio(self, idx: BlockIndex) -> torch.Tensor:
        """The block's 12 video-rate feature frames [1, L+1, D, 12] (zeros past the audio's end)."""
        n = FRAMES_PER_BLOCK * 4
        a = self.audio.clip(idx.clip)[..., idx.block * n:(idx.block + 1) * n]
        if a.shape[-1] < n:
            a = torch.nn.functional.pad(a, (0, n - a.shape[-1]))
        return a.to(self.device)

    def denoise_block(self, idx: BlockIndex) -> torch.Tensor:
        """4 (steps) Euler steps of one block; returns its clean latents [1, 16, 3, h, w]."""
        if idx.block == 0:
            g = torch.Generator(device=self.device).manual_seed(self.seed + idx.clip)
            self.noise = torch.randn(16, LATENT_FRAMES, self.h, self.w, dtype=self.dtype, device=self.device,
                                     generator=g)
        f0 = idx.block * FRAMES_PER_BLOCK
        x = self.noise[None, :, f0:f0 + FRAMES_PER_BLOCK]
        audio = self.block_audio(idx)
        for i in range(len(self.t)):
            t = torch.full((1, FRAMES_PER_BLOCK), float(self.t[i]), dtype=torch.float32, device=self.device)
            d = self.ref_shift_rng.randint(4, 30)
            v = self.guard(lambda: self.model(x, t, self.context, audio, self.kv[i], self.sink, idx.start_frame, d))
            x = euler_step(x, v, self.sigmas[i], self.sigmas[i + 1])
        return x

    def decode(self, latents) -> torch.Tensor:
        """[1, 16, 3, h, w] -> frames [3, 12, H, W] in [-1, 1]."""
        return self.decoder.decode(latents.to(self.vae.dtype))[0]


def load_dit_for_run(ckpt, opts: RunOptions, device, dtype, log=print):
    """The DiT from a bf16 checkpoint (+ LoRA merged at load) or a lowvram-quantized directory."""
    from lowvram.io.weights import load_dit
    from lowvram.quantize.format import detect_format, quantized_module_names, verify_manifest

    info = detect_format(ckpt.root)
    if info is None:
        lora = opts.lora if opts.lora is not None and Path(opts.lora).exists() else None
        if opts.lora is not None and lora is None:
            raise LowvramError(f"LoRA file {opts.lora} does not exist; download it with: huggingface-cli download "
                               "Quark-Vision/Live-Avatar --local-dir ckpt/LiveAvatar, or pass --lora")
        model = load_dit(ckpt, lora=lora, lora_alpha=opts.lora_alpha, device=device, dtype=dtype)
        return model, "bf16" if dtype == torch.bfloat16 else str(dtype).replace("torch.", "")
    verify_manifest(ckpt.root, verify_hashes=opts.verify)
    names = quantized_module_names(ckpt.root)
    log(f"quantized checkpoint: {info.scheme} (LoRA already merged)")
    model = load_dit(ckpt, device=device, dtype=dtype, quantized=names)
    return model, info.scheme


def run(opts: RunOptions, progress=None, log=print) -> RunResult:
    """Generate the video described by opts; see the module docstring for the order of work."""
    from lowvram.io.video_writer import VideoWriter
    from lowvram.io.weights import discover
    from lowvram.model.vae import load_vae
    from lowvram.runtime.engine import guarded, place

    t_start = time.perf_counter()
    inputs = check_inputs(opts)
    ckpt = discover(opts.ckpt_dir)
    device, dtype = resolve_device(opts.device, opts.dtype)
    timings = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    profile, plan = make_run_plan(opts, ckpt, inputs, device, log)
    t5_mode = profile.t5 if profile is not None else opts.t5
    t5_device = torch.device("cpu") if t5_mode == "cpu" else device
    context = encode_prompt(ckpt, opts.prompt, t5_device, dtype, "bf16" if t5_mode == "cpu" else t5_mode, log)
    audio_feats, clips = encode_audio(ckpt, inputs.wave, device, opts.num_clip)
    vae = load_vae(ckpt.vae, device=device, dtype=dtype)
    ref, motion = encode_conditioning(vae, inputs.image.to(device))
    model, scheme = load_dit_for_run(ckpt, opts, torch.device("cpu") if plan is not None else device, dtype, log)
    model.attention = profile.attention if profile is not None else opts.attention
    if profile is not None:
        from lowvram.quantize.linear import set_gemm_backend

        set_gemm_backend(model, profile.gemm)
    tokens = (inputs.height // 16) * (inputs.width // 16)
    placement = place(model, plan, device, tokens, dtype=dtype)
    timings["setup_s"] = time.perf_counter() - t_start

    gen = Generator(model, vae, context, audio_feats, ref, motion, opts.steps, opts.seed, device, dtype,
                    kv_caches=placement.kv, guard=lambda f: guarded(f, placement, log),
                    sink_dtype=plan.sink_dtype if plan is not None else "bf16")
    # A/V sync (module docstring): audio starts at the first kept frame; past its end the frames were
    # driven by zero audio features, so it is padded with silence to the video's length
    wave = inputs.wave[DROPPED_FRAMES * AUDIO_RATE // FPS:]
    n_audio = output_frames(clips) * AUDIO_RATE // FPS
    wave = np.pad(wave, (0, max(0, n_audio - wave.shape[0])))
    blocks_per_clip = LATENT_FRAMES // FRAMES_PER_BLOCK
    total = clips * blocks_per_clip
    if progress is not None:
        headline = plan.headline() if plan is not None else f"{scheme}, all resident"
        progress.start(total_blocks=total, clips=clips,
                       headline=f"{inputs.width}x{inputs.height}, {clips} clip(s), {headline}, attention {model.attention}")
    frames = blocks = 0
    interrupted = False
    t_gen = time.perf_counter()
    dit_s = vae_s = 0.0
    clip0_frames = []
    try:
        with StopFlag() as flag, VideoWriter(str(opts.out), inputs.width, inputs.height, fps=FPS,
                                             audio=wave, audio_rate=AUDIO_RATE) as writer:
            for clip in range(clips):
                clip_latents = []
                for b in range(blocks_per_clip):
                    idx = BlockIndex(clip, b)
                    t0 = time.perf_counter()
                    lat = gen.denoise_block(idx)
                    _sync(device)
                    t1 = time.perf_counter()
                    video = gen.decode(lat)                                       # [3, 12, H, W]
                    if clip == 0 and b == 0:
                        video = video[:, DROPPED_FRAMES:]
                    kept = writer.write(video)
                    _sync(device)
                    dit_s += t1 - t0
                    vae_s += time.perf_counter() - t1
                    frames += kept
                    blocks += 1
                    clip_latents.append(lat)
                    if opts.online_decode and clip == 0:
                        clip0_frames.append(video.float().cpu())
                    if progress is not None:
                        progress.block_done(clip, b, frames, time.perf_counter() - t_gen, _peak(device))
                    if flag.stop:
                        interrupted = True
                        break
                if interrupted:
                    break
                if opts.online_decode and clip == 0 and clips > 1:
                    # as the reference: the first generated latent becomes the ref, and the motion latents are
                    # re-encoded from the motion window with clip 0's frames rolled in
                    ref = torch.cat(clip_latents, dim=2)[:, :, :1]
                    motion = reencode_motion(vae, inputs.image.to(device), torch.cat(clip0_frames, dim=1).to(device))
                    gen.refresh_sink(ref, motion)
    finally:
        if progress is not None:
            progress.finish()  # also when a block fails: the display must not be left running
    seconds = time.perf_counter() - t_gen
    timings.update(dit_s=dit_s, vae_s=vae_s, total_s=time.perf_counter() - t_start)
    return RunResult(Path(opts.out), frames, clips, blocks, seconds, interrupted, _peak(device), timings)


def reencode_motion(vae, image, clip0_video):
    """Motion latents after clip 0 with online decode: the 365-frame window of ref pixels with the
    decoded clip-0 frames [3, T, H, W] rolled in at the end, VAE-encoded; the last 19 latents."""
    n = REF_REPEAT * MOTION_FRAMES
    keep = min(MOTION_FRAMES, clip0_video.shape[1])
    window = torch.cat([image[:, None].expand(-1, n - keep, -1, -1), clip0_video[:, -keep:]], dim=1)
    z = vae.encode(window[None].to(vae.dtype))
    return z[:, :, -((MOTION_FRAMES + 3) // 4):]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device) -> int:
    return torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0
