"""One rank of `lowvram run --gpus N`, from its plan to its report (the loops are in lowvram.parallel.loops).

Order of work: inputs and this rank's plan, agreed by every rank before any weights load (one rank's card
too small is everyone's one-line error) -> rank 0 encodes (umT5, wav2vec2 features, VAE encode) and
posts the broadcasts of the prompt embedding and the ref/motion latents (the clip count and shapes go
through the store), while the other DiT ranks load their DiT and the VAE rank its VAE -> every DiT rank
places its DiT with its own steps' caches and prefills its sink; the writer warms its decoder and opens
the mp4 -> the loops -> statistics to the store; the writer gathers them into the report and the result.
The audio features stay on rank 0 and travel with each block's latents (`loops`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch

from lowvram.constants import GIB
from lowvram.errors import LowvramError
from lowvram.parallel.comm import Links
from lowvram.parallel.plans import DecodePlan
from lowvram.parallel.loops import Timer, dit_loop, writer_loop
from lowvram.parallel.roles import Pipeline
from lowvram.parallel.world import StopRequested, Watch, World

T0_ENV = "LOWVRAM_TPP_T0"  # the launcher's start time (epoch seconds): time to first frame counts from it


@dataclass
class Conditioning:
    clips: int
    context: torch.Tensor  # [L, text_dim] fp32 CPU
    ref: torch.Tensor  # [1, 16, 1, h, w]
    motion: torch.Tensor  # [1, 16, 19, h, w]
    audio_shape: tuple[int, int]  # (L+1, D) of the wav2vec2 features
    features: object = None  # rank 0: the per-clip feature source


class Rank:
    def __init__(self, opts, world: World, log=print, progress=None, local_stop=lambda: False):
        from lowvram.pipeline.options import resolve_device

        self.opts, self.world, self.log, self.progress = opts, world, log, progress
        self.pipe = Pipeline.of(world.size, opts.steps)
        self.role = self.pipe.roles[world.rank]
        self.device, self.dtype = resolve_device(str(world.device), opts.dtype)
        self.watch = Watch(world, self.role.describe(), local_stop)
        self.links = Links(self.watch, self.device)
        self.timer = Timer(self.device)
        self.writer = None
        self.forwards = self.blocks = 0
        self.interrupted = False
        self.t0 = float(os.environ.get(T0_ENV, time.time()))

    # ------------------------------------------------------------------ the run
    def run(self):
        from lowvram.pipeline.session import Phases
        from lowvram.runtime.machine import apply_vram_cap

        from lowvram.parallel.result import DevicePeak

        apply_vram_cap(self.device, self.opts.vram_cap_gib)
        self.phases, self.peak = Phases(self.device, self.log), DevicePeak(self.device).start()
        try:
            with self.phases("plan"):
                inputs = self._plan()
            cond, engine = self._setup(inputs)
            self.t_generate = time.time()
            try:
                with self.phases("generate"):
                    if self.role.steps:
                        dit_loop(self, engine, cond)
                    else:
                        writer_loop(self, cond)
            except StopRequested:
                self.interrupted = True
                self.watch.stopping = True
            return self._finish(cond)
        except BaseException:
            if self.writer is not None:
                self.writer.close(failed=True)  # the partial mp4 keeps every block written
            raise
        finally:
            if self.writer is not None:
                self.writer.close()
            if getattr(self, "_lock", None) is not None:
                self._lock.release()  # the file is closed: a later run may write this --out

    def _plan(self):
        """Inputs (rank 0 and the writer) and this rank's plan; every rank's verdict before any weights load."""
        from lowvram.pipeline.options import check_inputs
        from lowvram.runtime.machine import Machine

        from lowvram.parallel.plans import plan_rank

        inputs, error = None, None
        try:
            if self.role.encodes or self.role.writes:
                inputs = check_inputs(self.opts)
            if self.role.writes:  # held until this process exits: a second run writing this --out refuses now
                from lowvram.io.locks import lock_output

                self._lock = lock_output(self.opts.out)
            machine = Machine.detect(self.device, self.opts.vram_cap_gib)
            self.rank_plan = plan_rank(self.opts, self.role, machine, self.device, self.dtype, self.world.size)
        except LowvramError as e:
            error = " ".join(str(e).split())
        st = self.world.store
        st.set(f"plan/{self.world.rank}", json.dumps({"error": error, "headline": None if error else
                                                      self.rank_plan.plan.headline()}))
        verdicts = [json.loads(self.watch.wait_key(f"plan/{r}", "the plans")) for r in range(self.world.size)]
        errors = [v["error"] for v in verdicts if v["error"]]
        if errors:
            raise LowvramError(errors[0])
        self.log(f"rank {self.world.rank} ({self.rank_plan.device}, {self.role.describe()}): "
                 f"{self.rank_plan.plan.headline()}")
        return inputs

    def _setup(self, inputs):
        from lowvram.io.weights import discover
        from lowvram.model.vae import load_vae
        from lowvram.runtime.decode import make_decoder

        from lowvram.parallel.writer import BlockWriter

        ckpt = discover(self.opts.ckpt_dir)
        cond, works = self._encode(ckpt, inputs) if self.role.encodes else (None, [])
        engine = vae = None
        if self.role.steps:
            engine = self._engine(ckpt)
            vae = engine.vae
        elif self.role.writes:
            with self.phases("vae_load"):
                vae = load_vae(ckpt.vae, device=self.device, dtype=self.dtype)
        if cond is None:
            cond = self._receive()
        for w in works:
            self.watch.wait(w, "the conditioning broadcast")
        with self.phases("sink"):
            decode = dec = None
            if self.role.writes:
                dec = make_decoder(self._vae_decode(), vae, self.device, ckpt.root, self.opts.vae_path)
            if engine is not None:
                engine.start(cond.context, cond.ref, cond.motion, self.opts.steps, self.opts.seed, dec)
                decode = engine.decode if dec is not None else None
            elif dec is not None:
                dec.decode(cond.motion[:, :, :7].to(self.device, vae.dtype))  # warm-up, as Engine.start
                decode = lambda lat: dec.decode(lat.to(self.device, vae.dtype))[0]  # noqa: E731
        if self.role.writes:
            w, h = inputs.width, inputs.height
            headline = (f"{w}x{h}, {cond.clips} clip(s), {self.world.size} ranks, writer: "
                        f"{self.rank_plan.plan.headline()}")
            self.writer = BlockWriter(self.opts, inputs, cond.clips, decode, vae, self.world.store, self.device,
                                      self.t0, self.progress, headline)
        return cond, engine

    def _vae_decode(self) -> str:
        plan = self.rank_plan.plan
        return plan.vae_decode if isinstance(plan, DecodePlan) else plan.profile.vae_decode

    def _encode(self, ckpt, inputs):
        """Rank 0: the conditioning, and the broadcasts of it posted (waited after the DiT is placed)."""
        from lowvram.model.vae import load_vae
        from lowvram.pipeline.encode import clip_source, encode_audio, encode_conditioning, encode_prompt, free_memory

        from lowvram.parallel.comm import post_broadcast

        with self.phases("t5"):
            t5 = self.rank_plan.plan.t5
            context = encode_prompt(ckpt, self.opts.prompt, self.device, t5, self.log).float().contiguous()
        with self.phases("wav2vec2"):
            features, clips = encode_audio(ckpt, inputs.wave, self.device, self.opts.num_clip)
        with self.phases("vae_encode"):
            vae = load_vae(ckpt.vae, device=self.device, dtype=self.dtype)
            ref, motion = encode_conditioning(vae, inputs.image.to(self.device))
            ref, motion = ref.cpu().contiguous(), motion.cpu().contiguous()
            if not self.role.writes:
                del vae
                free_memory()
        source = clip_source(features)
        first = source.clip(0)
        cond = Conditioning(clips, context, ref, motion, tuple(first.shape[1:3]), source)
        if self.world.size > 1:
            self.world.store.set("cond", json.dumps(_header(cond)))
        works = post_broadcast([context, ref, motion], 0) if self.world.size > 1 else []
        if self.role.writes:
            self._vae = vae
        return cond, works

    def _receive(self) -> Conditioning:
        from lowvram.parallel.comm import broadcast

        head = json.loads(self.watch.wait_key("cond", "the conditioning"))
        t = {k: torch.empty(s, dtype=getattr(torch, d)) for k, (s, d) in head["tensors"].items()}
        broadcast(self.watch, [t["context"], t["ref"], t["motion"]], 0, "the conditioning")
        return Conditioning(head["clips"], t["context"], t["ref"], t["motion"], tuple(head["audio_shape"]))

    def _engine(self, ckpt):
        from lowvram.model.vae import load_vae
        from lowvram.pipeline.session import load_dit
        from lowvram.runtime.engine import Engine

        plan = self.rank_plan.plan
        with self.phases("dit_load"):  # placed at load when nothing streams: no second copy in host RAM
            model = load_dit(ckpt, self.opts, self.device if not plan.streamed else torch.device("cpu"), self.dtype,
                             self.log)
        vae = None
        if self.role.writes:
            vae = getattr(self, "_vae", None) or load_vae(ckpt.vae, device=self.device, dtype=self.dtype)
        with self.phases("place"):
            return Engine.build(model, plan, self.device, vae=vae, log=self.log)

    # ------------------------------------------------------------------ the end
    def _stats(self) -> dict:
        from lowvram.quantize.convert import peak_rss_bytes

        rows = self.phases.rows
        return {"rank": self.world.rank, "device": self.rank_plan.device, "role": self.role.describe(),
                "steps": list(self.role.steps), "headline": self.rank_plan.plan.headline(),
                "kv_note": self.rank_plan.kv_note, "phases": rows,
                "peak_allocated": max((p["peak_allocated"] for p in rows), default=0),
                "peak_reserved": max((p["peak_reserved"] for p in rows), default=0),
                "peak_device_used": self.peak.stop(), "forwards": self.forwards, "blocks": self.blocks,
                "dit_s": round(self.timer.seconds(), 4), **self.links.stats(),
                "bytes_per_block": self.links.bytes_sent // max(1, self.blocks),
                "generate_start": self.t_generate, "interrupted": self.interrupted,
                "peak_rss_bytes": peak_rss_bytes(), "plan": self.rank_plan.to_dict()}

    def _finish(self, cond):
        st = self.world.store
        st.set(f"stats/{self.world.rank}", json.dumps(self._stats(), default=str))
        if not self.role.writes:
            self.watch.stopping = True
            self.watch.wait_key("end", "the end of the run")
            return None
        from lowvram.parallel.result import ParallelResult

        self.writer.close()
        t_end = time.time()
        self.watch.stopping = True
        ranks = [json.loads(self.watch.wait_key(f"stats/{r}", "the statistics")) for r in range(self.world.size)]
        start = min(r["generate_start"] for r in ranks)
        w = self.writer
        phases = self.phases.rows
        res = ParallelResult(
            out=self.opts.out, frames=w.frames, clips=cond.clips, blocks=w.blocks, seconds=t_end - start,
            interrupted=self.interrupted or w.blocks < w.total, peak_vram=max(r["peak_reserved"] for r in ranks),
            phases=phases, plan={"gpus": self.world.size, "ranks": [r["plan"] for r in ranks]},
            timings={"first_frame_s": w.first_frame_s, "vae_s": w.vae_s, "write_s": w.write_s, "block_s": w.block_s,
                     "setup_s": start - self.t0, "total_s": t_end - self.t0},
            host={"peak_rss_bytes": max(r["peak_rss_bytes"] for r in ranks)},
            gpus=self.world.size, ranks=[{k: v for k, v in r.items() if k != "plan"} for r in ranks])
        if self.opts.report is not None:
            res.write_report(self.opts.report)
        st.set("result", json.dumps(res.to_dict(), default=str))
        st.set("end", "1")
        return res


def _header(cond: Conditioning) -> dict:
    tensors = {k: (list(t.shape), str(t.dtype).rpartition(".")[2])
               for k, t in (("context", cond.context), ("ref", cond.ref), ("motion", cond.motion))}
    return {"clips": cond.clips, "audio_shape": list(cond.audio_shape), "tensors": tensors}


def peak_gib(n: int) -> float:
    return round(n / GIB, 2)
