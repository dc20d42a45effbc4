"""The steady part of a rank: the tick loop of a DiT rank, the loop of the VAE rank, the online-decode refresh.

Every DiT rank walks the same schedule (lowvram.runtime.schedule.ticks) and runs the works of its own
steps in each tick as one `Engine.run_works` call (one batched DiT call when the plan is batched). Per
block the messages are (N = 5; N <= 4 the same without the last hop, the last DiT rank writing itself):

    rank 0: noise(b) -> step 0 -> isend(latents, audio) to rank 1          (and computes b+1 at once)
    rank k: wait recv(b) -> irecv(b+1) posted -> step k -> isend(latents, audio) to rank k+1
    rank 3: wait recv(b) -> irecv(b+1) posted -> step 3 -> isend(latents) to rank 4
    rank 4: wait recv(b) -> irecv(b+1) posted -> VAE decode -> mp4 fragment

With online decode and more than one clip the schedule drains after clip 0; the writer makes the new ref
+ motion latents from clip 0's output and broadcasts them, and every DiT rank rebuilds its sink before
its first work of clip 1.
"""

from __future__ import annotations

import json
import os
import time

import torch

from lowvram.constants import BLOCKS_PER_CLIP, FRAMES_PER_BLOCK, VIDEO_FRAMES_PER_LATENT
from lowvram.parallel.comm import Spec, broadcast
from lowvram.pipeline.encode import block_audio
from lowvram.runtime.schedule import ticks

FAULT_ENV = "LOWVRAM_TPP_FAULT"  # "<rank>:<block>": raise at that block (tests and tools/bench_tpp.py)


def _global(idx) -> int:
    return idx.clip * BLOCKS_PER_CLIP + idx.block


class Timer:
    """Compute time of this rank's DiT calls: CUDA events (read once at the end) or the host clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pairs, self.host_s = [], 0.0
        self.last = None  # event after the latest call: this rank's own queued work

    def __enter__(self):
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pairs.append((self._start, end))
            self.last = end
        else:
            self.host_s += time.perf_counter() - self._t

    def seconds(self) -> float:
        if self.cuda and self.pairs:
            self.pairs[-1][1].synchronize()  # orders: the last DiT call before the events are read
            return sum(a.elapsed_time(b) for a, b in self.pairs) / 1e3
        return self.host_s


def specs(cond, dtype: torch.dtype) -> tuple[Spec, Spec]:
    """The latents of a block and its audio features."""
    h, w = cond.ref.shape[-2:]
    n = FRAMES_PER_BLOCK * VIDEO_FRAMES_PER_LATENT
    return (Spec((1, 16, FRAMES_PER_BLOCK, h, w), dtype),
            Spec((1, *cond.audio_shape, n), torch.float32))


def drain_points(opts, clips: int) -> list[int]:
    return [BLOCKS_PER_CLIP] if opts.online_decode and clips > 1 else []


def refresh(rk, engine) -> None:
    """The online-decode sink after clip 0: the writer makes and broadcasts it, every DiT rank rebuilds its own."""
    src = rk.pipe.writer
    if rk.role.writes:
        ref, motion = rk.writer.refresh_latents()
        rk.world.store.set("refresh", json.dumps({"ref": [list(ref.shape), str(ref.dtype)],
                                                  "motion": [list(motion.shape), str(motion.dtype)]}))
    else:
        head = json.loads(rk.watch.wait_key("refresh", "the refreshed sink"))
        ref, motion = (torch.empty(s, dtype=getattr(torch, d.rpartition(".")[2])) for s, d in head.values())
    broadcast(rk.watch, [ref, motion], src, "the refreshed sink")
    if engine is not None:
        engine.refresh_sink(ref, motion)


def _fault(rank: int, g: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec and spec == f"{rank}:{g}":
        raise RuntimeError(f"injected fault ({FAULT_ENV}={spec})")


def dit_loop(rk, engine, cond) -> None:
    """Run this rank's steps of every block (module docstring)."""
    pipe, role, links, watch, dev = rk.pipe, rk.role, rk.links, rk.watch, rk.device
    total = cond.clips * BLOCKS_PER_CLIP
    drain = drain_points(rk.opts, cond.clips)
    first, last = role.steps[0], role.steps[-1]
    up, down = pipe.upstream(role.rank), pipe.downstream(role.rank)
    lat, aud = specs(cond, engine.dtype)
    to_writer = down is not None and not pipe.roles[down].steps
    if up is not None:
        links.post(0, up, [lat, aud])
    local: dict[tuple[int, int], tuple] = {}  # (block, step) -> (latents, audio) handed to this rank's next step
    refreshed = not drain
    for tick in ticks(total, pipe.steps, drain):
        mine = [w for w in tick if w.step in role.steps]
        if not mine:
            continue
        watch.check()  # a block boundary: faults, stop requests
        gs = [_global(w.idx) for w in mine]
        if not refreshed and max(gs) >= drain[0]:
            refresh(rk, engine)
            refreshed = True
        xs, auds = [], []
        for w, g in zip(mine, gs):
            _fault(role.rank, g)
            if w.step == 0:
                x, a = engine.initial_latents(w.idx), block_audio(cond.features, w.idx).to(dev)
            elif w.step == first:
                x, a = links.take(g, own=rk.timer.last)
                if g + 1 < total:
                    links.post(g + 1, up, [lat, aud])
            else:
                x, a = local.pop((g, w.step))
            xs.append(x)
            auds.append(a)
        with rk.timer:
            outs = engine.run_works(mine, xs, auds)
        rk.forwards += len(mine)
        for w, g, out, a in zip(mine, gs, outs, auds):
            if w.step != last:
                local[(g, w.step + 1)] = (out, a)
            elif down is None:
                rk.writer.write(g, out)
            else:
                links.send([out] if to_writer else [out, a], down, g)
            if w.step == last:
                rk.blocks += 1
    links.flush()


def writer_loop(rk, cond) -> None:
    """The VAE rank: receive each block's clean latents, decode, write; the online-decode refresh after clip 0."""
    total = cond.clips * BLOCKS_PER_CLIP
    drain = drain_points(rk.opts, cond.clips)
    up = rk.pipe.upstream(rk.role.rank)
    lat, _ = specs(cond, rk.dtype)
    rk.links.post(0, up, [lat])
    for g in range(total):
        rk.watch.check()
        _fault(rk.role.rank, g)
        (x,) = rk.links.take(g)
        if g + 1 < total:
            rk.links.post(g + 1, up, [lat])
        rk.writer.write(g, x)
        rk.blocks += 1
        if drain and g == drain[0] - 1:
            refresh(rk, None)
