"""CUDA graphs of the steady DiT call: a whole call's launches replayed by the driver in one.

Why: a call enqueues about 1900 kernels and 2000 tensor allocations per sample. The host takes 535-584 ms to
enqueue a batched call of 4 that the GPU runs in 640-690 ms (H100, BENCHMARKS.md §3 and §5), so a faster kernel
leaves the call bound by the host, and the gaps between dependent kernels add up. A replayed graph launches the
same kernels with the same arguments without the host: a call's host work becomes `LiveAvatarDiT.prepare` (the
rings, the RoPE tables) and a few copies.

What repeats: in a video's steady state every call runs over the same step caches (where the plan's batch is all
its steps: one call per tick on one GPU, or one step per GPU), each full (its window is the whole ring), with the
same sink and text context and the same shapes. What changes from call to call are tensors only: the latents,
timesteps and audio (its features, or the tokens the engine encoded once per block), the RoPE multipliers of the queries and of each sample's sink positions, and where in each
ring the new chunk goes. `ForwardGraphs` captures `LiveAvatarDiT.run` once over static copies of those, the chunk
written at token positions held on the device (kv_cache.FullWindowWrites), and replays it with each call's values
copied in: the same kernels on the same values, so the same bits as the eager call.

Measured (H100, BENCHMARKS.md run K): the graphed `h100-80` run wrote the eager run's latents bit for bit but ran
1.3% slower (6.8% without the sink room): a batched call keeps the GPU busy for ~680 ms, behind which the host's
enqueue already hides, so every profile keeps `cuda_graphs = "off"`. What could still gain: calls of one forward
(`--gpus`' one rank per step), whose enqueue is as long as their kernels (BENCHMARKS.md section 5).

Policy:
- graphable: every cache a GpuKVCache (bf16) whose window is the whole ring once begun; anything else (host
  caches, kv8, a ring still filling) runs eagerly.
- one graph at a time, keyed by the shapes, the attention backend, the caches, the sink and the context (by
  identity: the graph holds them, so no id is reused while it lives). A key runs eagerly the first time (its
  warm-up: Triton's autotuning and compilation, cuDNN's plans), is captured the second time and replayed after.
  A call with another key releases the graph (and its pool's memory) first, so an eager call never runs beside a
  graph's pool; a new video and a sink refresh release it too (Engine).
- memory: between calls the pool keeps the call's activations, so the planner counts the DiT's and the decoder's
  activations at once, and "auto" takes graphs only where that costs no resident block or batch
  (planner.make_plan).
- a capture that fails (a library whose kernels cannot be captured) is logged once and the run goes on eagerly.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils._python_dispatch import TorchDispatchMode

from lowvram.runtime.kv_cache import FullWindowWrites, GpuKVCache


class CudaGraph:
    """torch.cuda.CUDAGraph: `capture(fn)` records fn's kernels without running them and returns its output, which
    every `replay` rewrites in place."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        # thread_local: another thread's CUDA calls (a writer's, a decoder's) neither join nor break the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class _Recorder(TorchDispatchMode):
    def __init__(self, ops: list):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class RecordedGraph:
    """CudaGraph's semantics on any device, for the tests of the CPU: `capture` runs fn once under a dispatch mode
    that records every ATen call with its arguments; `replay` runs the recorded calls again, each tensor that one
    of them made replaced by its new one, and copies the result into the captured output. Tensors made outside the
    capture (weights, caches, the static inputs) are read as they are at replay, and every decision of Python (an
    int, a slice, a branch, a shape) is the capture's: what a CUDA graph replays. Unlike a CUDA capture, the
    capture also runs fn."""

    def __init__(self):
        self.ops: list = []
        self.out: torch.Tensor | None = None

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.ops = []
        with _Recorder(self.ops):
            self.out = fn()
        return self.out

    def replay(self) -> None:
        made: dict[int, torch.Tensor] = {}  # id of a tensor made in the capture -> the one its op makes now

        def now(a):
            return made.get(id(a), a) if isinstance(a, torch.Tensor) else a

        with torch.no_grad():
            for func, args, kwargs, out in self.ops:
                res = func(*tree_map(now, args), **tree_map(now, kwargs))
                for old, new in zip(tree_leaves(out), tree_leaves(res)):
                    if isinstance(old, torch.Tensor):
                        made[id(old)] = new
        self.out.copy_(made.get(id(self.out), self.out))


BACKENDS = {"cuda": CudaGraph, "recorded": RecordedGraph}


class _Key:
    """What a graph replays: the shapes and dtypes of a call's inputs, the attention backend, and its caches, sink
    and context by identity (held weakly: a key seen once keeps nothing alive)."""

    def __init__(self, model, x, t, context, audio, sink, kvs):
        self.shapes = (tuple(x.shape), x.dtype, x.device, tuple(t.shape), t.dtype,
                       tuple((tuple(a.shape), a.dtype) for a in tree_leaves(audio)), str(model.attention))
        self.refs = [weakref.ref(o) for o in (sink, context, *kvs)]

    def same(self, other: "_Key") -> bool:
        return (self.shapes == other.shapes and len(self.refs) == len(other.refs)
                and all(a() is not None and a() is b() for a, b in zip(self.refs, other.refs)))


def graphable(kvs, x: torch.Tensor, backend: str) -> bool:
    """Whether a begun call can be a graph's: every cache a bf16 GpuKVCache with a full window, on CUDA for
    the CUDA backend."""
    if backend == "cuda" and x.device.type != "cuda":
        return False
    return all(type(c) is GpuKVCache and c.end == c.capacity for c in kvs)


class _Graph:
    """One captured call: the static tensors it reads, the caches' write positions, its output."""

    def __init__(self, key: _Key, backend: str, x, t, context, audio, sink, call):
        from lowvram.model.dit import Call

        self.key = key
        self.held = [sink, context, *call.kvs]  # alive while the graph may read them
        self.x, self.t = x.clone(), t.clone()
        self.audio = tree_map(torch.clone, audio)  # the features, or their AudioTokens (the model's encode_audio)
        self.cos, self.sin = call.cos.clone(), call.sin.clone()
        self.sinks = [(c.clone(), s.clone()) for c, s in call.sinks]
        self.pos = [torch.empty(c.n_new, dtype=torch.long, device=x.device) for c in call.kvs]
        self.call = Call([FullWindowWrites(c, p) for c, p in zip(call.kvs, self.pos)], self.cos, self.sin, self.sinks)
        self.graph = BACKENDS[backend]()
        self.out: torch.Tensor | None = None

    def load(self, x, t, audio, call) -> None:
        """Copy one call's values in (on the device, in stream order): inputs, RoPE tables, write positions."""
        pairs = [(self.x, x), (self.t, t), (self.cos, call.cos), (self.sin, call.sin)]
        for dst, src in pairs + list(zip(tree_leaves(self.audio), tree_leaves(audio))):
            dst.copy_(src)
        for (c, s), (c1, s1) in zip(self.sinks, call.sinks):
            c.copy_(c1)
            s.copy_(s1)
        for p, kv in zip(self.pos, call.kvs):
            p.copy_(kv.positions()[kv.off:kv.off + kv.n_new])

    def capture(self, model, context, sink) -> None:
        self.out = self.graph.capture(lambda: model.run(self.x, self.t, context, self.audio, sink, self.call))


class ForwardGraphs:
    """The model's calls through one graph at a time (module docstring): call it as the model is called.
    backend: "cuda" (torch.cuda.CUDAGraph) or "recorded" (RecordedGraph, the CPU tests' stand-in)."""

    def __init__(self, model, backend: str = "cuda", log=print):
        if backend not in BACKENDS:
            raise ValueError(f"graph backend {backend!r} is not one of {', '.join(BACKENDS)}")
        self.model, self.backend, self.log = model, backend, log
        self.graph: _Graph | None = None
        self.seen: _Key | None = None  # the last graphable key run eagerly: captured if the next call has it too
        self.disabled = ""  # why graphs are off for the rest of the run (a capture failed)
        self.captures = self.replays = self.eager = 0

    def __call__(self, x, t, context, audio, kv, sink, start_frame, ref_shift) -> torch.Tensor:
        m = self.model
        call = m.prepare(x, t, audio, kv, sink, start_frame, ref_shift)
        key = None
        if not self.disabled and graphable(call.kvs, x, self.backend):
            key = _Key(m, x, t, context, audio, sink, call.kvs)
        if self.graph is not None and (key is None or not self.graph.key.same(key)):
            self.release()
        if key is not None and self.graph is None:
            if self.seen is not None and self.seen.same(key):
                self._capture(key, x, t, context, audio, sink, call)
            else:
                self.seen = key
        if self.graph is None:
            self.eager += 1
            return m.run(x, t, context, audio, sink, call)
        self.graph.load(x, t, audio, call)
        self.graph.graph.replay()
        self.replays += 1
        return self.graph.out.clone()  # the next replay rewrites out

    def _capture(self, key, x, t, context, audio, sink, call) -> None:
        g = _Graph(key, self.backend, x, t, context, audio, sink, call)
        g.load(x, t, audio, call)  # the capture reads real values (RecordedGraph runs it)
        try:
            g.capture(self.model, context, sink)
        except Exception as e:  # noqa: BLE001 - any failure of a capture leaves the run eager, said once
            self.disabled = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            self.log(f"CUDA graphs off for this run: capturing the DiT call failed ({self.disabled}); "
                     "running eagerly (--set cuda_graphs=off skips the attempt)")
            return
        self.graph, self.seen = g, None
        self.captures += 1

    def release(self) -> None:
        """Drop the graph (its pool's memory returns to the allocator) and what it held."""
        self.graph = None
        self.seen = None

    def stats(self) -> dict:
        return {"captures": self.captures, "replays": self.replays, "eager_calls": self.eager,
                "disabled": self.disabled}
