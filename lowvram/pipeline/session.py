"""`Session`: the models of `lowvram run` loaded once and reused across jobs (the CLI's one run, a batch,
the web page).

Order of work for a job (each model is freed before the next is needed): inputs checked -> plan ->
prompt embedding (disk cache, else umT5) -> wav2vec2 features -> VAE encode of ref/motion latents ->
DiT loaded and placed by the plan (reused when the checkpoint and the plan are the same) -> sink
prefill -> the ticks of the timestep-forcing schedule (4 blocks per clip x `steps` Euler steps; one
forward per tick in block order, or with a batched plan one DiT call per tick) -> each finished block
decoded by the streaming VAE (on its own CUDA stream beside the next DiT call when the plan overlaps them:
the profile's vae_overlap) and written to the mp4 as soon as its frames are back, in order. While an engine is placed, a prompt missing from the cache is
encoded on the CPU (umT5 would not fit beside the DiT); `encode_prompts` does a batch's prompts first.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lowvram.constants import AUDIO_RATE, BLOCKS_PER_CLIP, DROPPED_FRAMES, FPS
from lowvram.errors import LowvramError
from lowvram.pipeline.encode import (
    block_audio,
    clip_source,
    encode_audio,
    encode_conditioning,
    encode_prompt,
    free_memory,
    muxed_audio,
    reencode_motion,
)
from lowvram.pipeline.options import BlockEvent, RunOptions, RunResult, check_inputs, resolve_device
from lowvram.runtime.schedule import BlockIndex, ticks


def plan_for(opts: RunOptions, machine=None):
    """The Plan of `opts` without loading any weights (what `lowvram plan` prints for the same options)."""
    from lowvram.runtime.machine import Machine
    from lowvram.runtime.plan import plan_run

    device, dtype = resolve_device(opts.device, opts.dtype)
    machine = machine or Machine.detect(device, opts.vram_cap_gib)
    return plan_run(opts.ckpt_dir, opts.profile, opts.plan_overrides(), opts.size, Path(opts.image), machine,
                    device, dtype, opts.steps)


def load_dit(ckpt, opts: RunOptions, device, dtype, log=print):
    """The DiT from a bf16 checkpoint (+ LoRA merged at load) or a lowvram-quantized directory."""
    from lowvram.io.weights import DOWNLOAD_LORA
    from lowvram.io.weights import load_dit as load
    from lowvram.quantize.format import detect_format, quantized_module_names, verify_manifest

    info = detect_format(ckpt.root)
    if info is None:
        lora = opts.lora if opts.lora is not None and Path(opts.lora).exists() else None
        if opts.lora is not None and lora is None:
            raise LowvramError(f"LoRA file {opts.lora} does not exist; download it with: {DOWNLOAD_LORA}, or pass --lora")
        return load(ckpt, lora=lora, lora_alpha=opts.lora_alpha, device=device, dtype=dtype)
    verify_manifest(ckpt.root, verify_hashes=opts.verify)
    log(f"quantized checkpoint: {info.scheme} (LoRA already merged)")
    return load(ckpt, device=device, dtype=dtype, quantized=quantized_module_names(ckpt.root))


PHASE_LABELS = {"plan": "planning", "t5": "prompt embedding (umT5)", "wav2vec2": "voice features (wav2vec2)",
                "vae_encode": "portrait latents (VAE encode)", "dit_load": "loading the DiT", "place": "placing the DiT",
                "sink": "sink prefill"}


class Phases:
    """Wall time and the device's peak memory of each phase of a run; each phase is logged as it starts and
    with its time when it ends, so a person sees what runs from the first second."""

    def __init__(self, device: torch.device, log=print):
        self.device, self.rows, self.log = device, [], log

    @contextmanager
    def __call__(self, name: str):
        cuda = self.device.type == "cuda"
        label = PHASE_LABELS.get(name)
        if label:
            self.log(f"{label} ...")
        if cuda:
            torch.cuda.synchronize(self.device)  # orders: the previous phase's kernels before its end time
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(self.device)  # orders: this phase's kernels before its end time
        if label:
            self.log(f"{label}: {time.perf_counter() - t0:.1f} s")
        self.rows.append({"name": name, "seconds": round(time.perf_counter() - t0, 4),
                          "peak_allocated": torch.cuda.max_memory_allocated(self.device) if cuda else 0,
                          "peak_reserved": torch.cuda.max_memory_reserved(self.device) if cuda else 0})


@dataclass
class _Loaded:
    key: tuple
    model: object
    engine: object | None = None


class Session:
    """Models loaded once for many jobs; `run(opts)` makes one video."""

    def __init__(self, log=print):
        self.log = log
        self._dit: _Loaded | None = None
        self._vae: tuple | None = None  # (key, WanVAE)
        self.peak_vram = 0

    # ------------------------------------------------------------------ models
    def _vae_for(self, ckpt, device, dtype):
        from lowvram.model.vae import load_vae

        key = (str(ckpt.vae), str(device), dtype)
        if self._vae is None or self._vae[0] != key:
            self._vae = (key, load_vae(ckpt.vae, device=device, dtype=dtype))
        return self._vae[1]

    def _engine_for(self, ckpt, opts, plan, device, dtype, phases):
        from lowvram.runtime.engine import Engine

        key = (str(ckpt.root), str(opts.lora), opts.lora_alpha, str(device), dtype, plan)
        if self._dit is not None and self._dit.key == key:
            self.log("DiT: reused (same checkpoint and plan)")
            return self._dit.engine
        self.release()
        with phases("dit_load"):  # placed at load when nothing streams: no second copy in host RAM
            model = load_dit(ckpt, opts, device if not plan.streamed else torch.device("cpu"), dtype, self.log)
        with phases("place"):
            engine = Engine.build(model, plan, device, vae=self._vae_for(ckpt, device, dtype), log=self.log)
        self._dit = _Loaded(key, model, engine)
        return engine

    def release(self) -> None:
        """Drop the placed DiT (its device memory and host slabs); the VAE stays."""
        if self._dit is not None:
            if self._dit.engine is not None:
                self._dit.engine.release()
            self._dit = None
            free_memory()

    def close(self) -> None:
        self.release()
        self._vae = None
        free_memory()

    def encode_prompts(self, jobs: list[RunOptions]) -> None:
        """Put the prompt embeddings of `jobs` in the disk cache before any DiT is placed (a batch's first step),
        so that umT5 runs on the device as its plan says instead of on the CPU beside a placed DiT."""
        from lowvram.io.weights import discover

        self.release()
        for opts in jobs:
            plan = plan_for(opts)
            device, _ = resolve_device(opts.device, opts.dtype)
            encode_prompt(discover(opts.ckpt_dir), opts.prompt, device, plan.t5, self.log)

    # ------------------------------------------------------------------ a job
    def run(self, opts: RunOptions, progress=None, on_block: Callable[[BlockEvent], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> RunResult:
        """Generate the video described by opts (see the module docstring for the order of work)."""
        from lowvram.io.locks import lock_output

        t_start = time.perf_counter()
        with lock_output(opts.out):  # a second run writing this --out refuses now, before any work
            return self._run_locked(opts, progress, on_block, should_stop, t_start)

    def _run_locked(self, opts, progress, on_block, should_stop, t_start) -> RunResult:
        job = self._condition(opts)
        engine = self._engine_for(job.ckpt, opts, job.plan, job.device, job.dtype, job.phases)
        with job.phases("sink"):
            from lowvram.runtime.decode import make_decoder

            decoder = make_decoder(job.plan.profile.vae_decode, job.vae, job.device, job.ckpt.root, opts.vae_path)
            engine.start(job.context, job.ref, job.motion, opts.steps, opts.seed, decoder)
        setup_s = time.perf_counter() - t_start
        if progress is not None:
            progress.start(total_blocks=job.clips * BLOCKS_PER_CLIP, clips=job.clips,
                           headline=f"{job.inputs.width}x{job.inputs.height}, {job.clips} clip(s), "
                                    f"{job.plan.headline()}, attention {job.plan.attention}")
        try:
            with job.phases("generate"):
                gen = self._generate(job, engine, progress, on_block, should_stop, t_start)
        finally:
            if progress is not None:
                progress.finish()  # also when a block fails: the display must not be left running
        peak = max((p["peak_reserved"] for p in job.phases.rows), default=0)
        self.peak_vram = max(self.peak_vram, peak)
        res = RunResult(Path(opts.out), gen.frames, job.clips, gen.blocks, gen.seconds, gen.interrupted, peak,
                        job.phases.rows, job.plan.to_dict(),
                        {"setup_s": setup_s, **gen.timings, "total_s": time.perf_counter() - t_start},
                        _host_stats(engine))
        if opts.report is not None:
            res.write_report(opts.report)
        return res

    def _condition(self, opts: RunOptions) -> "_Job":
        """Inputs checked, the plan, and the conditioning: prompt embedding, audio features, ref/motion latents."""
        from lowvram.io.partials import partials_note
        from lowvram.io.weights import discover
        from lowvram.runtime.machine import Machine, apply_vram_cap

        inputs = check_inputs(opts, log=self.log)
        note = partials_note(opts.out)
        if note:
            self.log(note)
        ckpt = discover(opts.ckpt_dir)
        device, dtype = resolve_device(opts.device, opts.dtype)
        apply_vram_cap(device, opts.vram_cap_gib)
        phases = Phases(device, self.log)
        with phases("plan"):
            plan = plan_for(opts, Machine.detect(device, opts.vram_cap_gib))
        with phases("t5"):
            cpu = self._dit is not None and plan.t5 != "cpu" and not _cached(ckpt, opts.prompt, plan.t5)
            if cpu:
                self.log("prompt not in the cache: umT5 runs on the CPU beside the placed DiT")
            context = encode_prompt(ckpt, opts.prompt, device, "cpu" if cpu else plan.t5, self.log)
        with phases("wav2vec2"):
            features, clips = encode_audio(ckpt, inputs.wave, device, opts.num_clip)
        with phases("vae_encode"):
            vae = self._vae_for(ckpt, device, dtype)
            ref, motion = encode_conditioning(vae, inputs.image.to(device))
        return _Job(opts, inputs, ckpt, device, dtype, plan, phases, context, clip_source(features), clips, vae,
                    ref, motion)

    def _generate(self, job: "_Job", engine, progress, on_block, should_stop, t_start: float) -> "_Generated":
        """The streaming loop over the ticks of the timestep-forcing schedule (schedule.ticks). A sequential
        plan (batch 1) drains before every block, so its ticks are today's order: block by block, each
        block's steps one forward after the other. A batched plan runs a tick's (block, step) pairs as one
        DiT call and drains only at clip 1 with online decode, where the sink is refreshed from clip 0 (as
        the reference: the first generated latent becomes the ref, and the motion latents are re-encoded from
        the motion window with clip 0's frames rolled in). A block is decoded and written as soon as its last
        step is done; blocks finish in order. Stopping (should_stop, polled after each written block) ends the
        run at that block: the tick in flight has finished, the blocks still being denoised are dropped, and
        the file holds every finished block."""
        from lowvram.io.video_writer import VideoWriteError, VideoWriter
        from lowvram.io.writer_thread import BackgroundWriter

        opts, device, total = job.opts, job.device, job.clips * BLOCKS_PER_CLIP
        steps = len(engine.t)
        refresh = opts.online_decode and job.clips > 1
        drain = range(1, total) if engine.plan.batch <= 1 else ([BLOCKS_PER_CLIP] if refresh else [])
        g = _Generated()
        dit_s = vae_s = write_s = 0.0
        clip0_frames, clip_s, ref = [], [], None
        latents: dict[BlockIndex, torch.Tensor] = {}  # blocks in flight: their latents after the last step run
        # finished blocks decode in order behind a queue, on their own stream when the plan overlaps them with
        # the DiT; float frames when clip 0's are re-encoded for the sink refresh, else uint8 (4x fewer bytes)
        queue, decoding = engine.decode_queue(to_uint8=not refresh), deque()  # decoding: the queue's blocks
        t_gen = t_clip = time.perf_counter()
        with BackgroundWriter(VideoWriter(str(opts.out), job.inputs.width, job.inputs.height, fps=FPS,
                                          audio=muxed_audio(job.inputs.wave, job.clips), audio_rate=AUDIO_RATE,
                                          final=not opts.partial_out)) as writer:  # encodes beside the DiT

            def write(done: list) -> bool:
                """Write decoded blocks (oldest first); True when should_stop asks to end the run."""
                nonlocal write_s, t_clip
                for frames in done:
                    clip, b = decoding.popleft()
                    video = frames if queue.to_uint8 else frames[0]  # uint8 [12, H, W, 3] | float [3, 12, H, W]
                    if clip == 0 and b == 0:
                        video = video[DROPPED_FRAMES:] if queue.to_uint8 else video[:, DROPPED_FRAMES:]
                    t2 = time.perf_counter()
                    g.frames += writer.write(video)
                    t3 = time.perf_counter()
                    write_s += t3 - t2
                    g.timings.setdefault("first_frame_s", t3 - t_start)
                    g.blocks += 1
                    if refresh and clip == 0:
                        clip0_frames.append(video.float().cpu())
                    if b == BLOCKS_PER_CLIP - 1:
                        clip_s.append(t3 - t_clip)
                        t_clip = t3
                    peak, now = _peak(device), time.perf_counter() - t_gen
                    if progress is not None:
                        progress.block_done(clip, b, g.frames, now, peak)
                    if on_block is not None:
                        on_block(BlockEvent(clip, b, g.blocks, total, g.frames, now, peak,
                                            str(writer.partial_path or opts.out)))
                    if should_stop is not None and should_stop():
                        g.interrupted = True
                        return True
                return False

            def waited(fn):  # the queue's frames, the time spent waiting for them counted as VAE time
                nonlocal vae_s
                t1 = time.perf_counter()
                out = fn()
                if not engine.plan.vae_overlap:
                    _sync(device)  # a serial decode ran on this stream: its time is the VAE's, not the next tick's
                vae_s += time.perf_counter() - t1
                return out

            try:
                for tick in ticks(total, steps, drain_before=drain):
                    if refresh and any(w.step == 0 and w.idx == BlockIndex(1, 0) for w in tick):
                        if write(waited(queue.drain)):  # clip 0's frames, all of them, before the refresh
                            break
                        motion = reencode_motion(job.vae, job.inputs.image.to(device),
                                                 torch.cat(clip0_frames, dim=1).to(device))
                        engine.refresh_sink(ref, motion)
                    t0 = time.perf_counter()
                    xs = [latents.pop(w.idx) if w.step else engine.initial_latents(w.idx) for w in tick]
                    outs = engine.run_works(tick, xs, [block_audio(job.features, w.idx) for w in tick])
                    _sync(device)
                    dit_s += time.perf_counter() - t0
                    for w, lat in zip(tick, outs):
                        if w.step < steps - 1:
                            latents[w.idx] = lat
                            continue
                        if refresh and w.idx == BlockIndex(0, 0):
                            ref = lat[:, :, :1]  # the first generated latent becomes the refreshed sink's ref
                        decoding.append((w.idx.clip, w.idx.block))  # the block is done: decode it, then write
                        waited(lambda: queue.submit(lat.to(job.vae.dtype)))
                    if write(queue.ready()):
                        break
                else:
                    write(waited(queue.drain))
            except LowvramError as e:  # the writer keeps the finished blocks in its partial file
                if isinstance(e, VideoWriteError) or not writer.frames_written:
                    raise
                raise LowvramError(f"{e} (the {writer.frames_written} frames written so far are in "
                                   f"{writer.partial_path})") from e
            finally:
                queue.drain()  # a stop or a fault drops the decodes in flight, after they have finished
        g.seconds = time.perf_counter() - t_gen
        g.timings.update(dit_s=dit_s, vae_s=vae_s, write_s=write_s, clip_s=clip_s)
        return g


@dataclass
class _Job:
    """A job between conditioning and generation."""

    opts: RunOptions
    inputs: object
    ckpt: object
    device: torch.device
    dtype: torch.dtype
    plan: object
    phases: Phases
    context: torch.Tensor
    features: object
    clips: int
    vae: object
    ref: torch.Tensor
    motion: torch.Tensor


@dataclass
class _Generated:
    frames: int = 0
    blocks: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)


def _cached(ckpt, prompt: str, t5_mode: str) -> bool:
    from lowvram.io import prompt_cache

    quant = "bf16" if t5_mode == "cpu" else t5_mode
    return prompt_cache.load(prompt_cache.prompt_key(prompt, ckpt.t5, quant)) is not None


def _host_stats(engine) -> dict:
    from lowvram.quantize.convert import peak_rss_bytes

    pinned = engine.streamer.pinned_bytes if engine.streamer is not None else 0
    pinned += sum(c.nbytes for c in engine.kv if getattr(c, "pinned", False))
    return {"peak_rss_bytes": peak_rss_bytes(), "pinned_bytes": pinned}


def _sync(device):
    if device.type == "cuda":  # orders: the tick's kernels before the host reads the clock; only this stream,
        torch.cuda.current_stream(device).synchronize()  # a decode on its own stream keeps running


def _peak(device) -> int:
    return torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0
