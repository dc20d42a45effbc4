"""Running the VAE decode beside the DiT: CUDA graphs for its steady steps, and its own stream.

- `GraphedDecoder`: a `StreamingDecoder` whose steady-state steps (same latent count, same
  cache shapes as the step before) are captured once as a CUDA graph and then replayed: one
  launch per step instead of ~1-2 thousand. The time cache is static (its slots keep their
  addresses); the graph's private memory pool holds one step's activations for as long as the
  decoder lives. Same kernels, same bits as the eager steps.
- `OverlappedDecoder`: `submit(latents)` queues a block's decode on a stream of its own, ordered
  after the work already queued on the caller's stream (the DiT's write of the latents), copies
  the frames to pinned host memory, and returns at once, so the caller goes on launching the next
  block's DiT work; `ready()` / `drain()` hand back the frames of finished blocks in order. On
  the CPU it decodes synchronously.

Memory (the planner's share): while a decode runs beside the DiT its activations live beside the
DiT's, and the caching allocator keeps the decode stream's blocks for that stream. So the DiT's
budget loses the decoder's peak step activations (tools/bench_vae.py measures it per variant)
plus the frames of up to `max_pending` blocks (fp32 on the device until copied; pinned on the host).
"""

from __future__ import annotations

from collections import deque

import torch

from lowvram.model.vae import DecodeOptions, StreamingDecoder, WanVAE
from lowvram.model.vae_blocks import TimeCache


class GraphedDecoder(StreamingDecoder):
    """`StreamingDecoder` that replays each steady-state step as a CUDA graph (eager on the CPU)."""

    def __init__(self, vae: WanVAE, opts: DecodeOptions = DecodeOptions()) -> None:
        super().__init__(vae, opts)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._steady: dict[tuple, tuple] = {}

    def _new_cache(self) -> TimeCache:
        return TimeCache(static=True)

    def reset(self) -> None:
        super().reset()
        self.graphs.clear()  # they read and write the old cache's tensors
        self._steady.clear()

    def _signature(self):
        """Shapes of the cache slots, or None while some slot holds no tensor yet."""
        slots = self.cache.slots
        if not slots or not all(isinstance(s, torch.Tensor) for s in slots):
            return None
        return tuple((s.shape, s.dtype, s.data_ptr()) for s in slots)

    def _run(self, z: torch.Tensor) -> torch.Tensor:
        if not z.is_cuda:
            return self._step(z)
        key = tuple(z.shape)
        if key not in self.graphs:
            sig = self._signature()
            if sig is None or self._steady.get(key) != sig:
                out = self._step(z)  # eager; steady once a step of this shape leaves the slots as it found them
                if sig is not None and self._signature() == sig:
                    self._steady[key] = sig
                return out
            self._capture(z)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(z)
        graph.replay()
        return static_out.clone()

    def _capture(self, z: torch.Tensor) -> None:
        # The eager step of this shape just before is the warm-up (cuDNN plans chosen, Triton
        # kernels compiled). Capturing records kernels without running them, so the cache is unchanged.
        static_in = z.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = self._step(static_in)
        self.graphs[tuple(z.shape)] = (graph, static_in, static_out)


class OverlappedDecoder:
    """Decode blocks on their own CUDA stream while the caller queues the next block's DiT work.

    decoder: a `StreamingDecoder`, `GraphedDecoder` or `TinyStreamingDecoder` (anything with
    `decode(z)`, `state_tensors()` and `vae.device`).

    submit(latents): latents [B, z, n, h, w] just written on the caller's current stream. The
    decode waits for that stream's queued work (an event), runs `decoder.decode`, copies the
    frames to pinned host memory, and records a completion event; the call returns after
    launching (eager steps cost CPU launch time, a `GraphedDecoder`'s replays almost none).
    ready(): host frames of the blocks finished so far, oldest first, without waiting.
    drain(): waits for every submitted block and returns the rest of the frames in order.
    Frames are what `decoder.decode` returns ([B, 3, F, H, W] float32), or with `to_uint8` the
    writer's uint8 [F, H, W, 3] (B must be 1), converted on the device (4x fewer bytes to copy).
    At most `max_pending` decodes are in flight: `submit` waits for the oldest beyond that.
    On the CPU, or with `overlap=False` (a profile's `vae_overlap = "off"`), every call is synchronous on
    the caller's stream and the frames stay on the decoder's device.
    """

    def __init__(self, decoder, to_uint8: bool = False, max_pending: int = 2, overlap: bool = True) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.decoder = decoder
        self.to_uint8 = to_uint8
        self.max_pending = max_pending
        device = decoder.vae.device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" and overlap else None
        self._queue: deque[tuple[torch.cuda.Event | None, torch.Tensor]] = deque()

    def _frames(self, latents: torch.Tensor) -> torch.Tensor:
        frames = self.decoder.decode(latents)
        if self.to_uint8:
            from lowvram.io.video_writer import to_uint8

            frames = to_uint8(frames)  # [F, H, W, 3] on the decoder's device
        return frames

    def submit(self, latents: torch.Tensor) -> None:
        if self.stream is None:
            self._queue.append((None, self._frames(latents)))
            return
        in_flight = [ev for ev, _ in self._queue if not ev.query()]
        if len(in_flight) >= self.max_pending:
            in_flight[len(in_flight) - self.max_pending].synchronize()  # bound the blocks in flight
        written = torch.cuda.Event()
        written.record(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(written)  # orders the decode after the DiT's write of the latents
            # memory made on the caller's stream and read here must not be reused there before the
            # decode has run: the latents (the caller may drop them at once) and any cache slots
            # from decodes run on the caller's stream (the warm-up), which this decode replaces
            if latents.is_cuda:
                latents.record_stream(self.stream)
            for t in self.decoder.state_tensors():
                t.record_stream(self.stream)
            frames = self._frames(latents)
            host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
            host.copy_(frames, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)  # the host copy is complete when this fires
        self._queue.append((done, host))

    def ready(self) -> list[torch.Tensor]:
        out = []
        while self._queue and (self._queue[0][0] is None or self._queue[0][0].query()):
            out.append(self._queue.popleft()[1])
        return out

    def drain(self) -> list[torch.Tensor]:
        out = []
        while self._queue:
            done, frames = self._queue.popleft()
            if done is not None:
                done.synchronize()  # the decode and the copy to the pinned host buffer have finished
            out.append(frames)
        return out

    @property
    def pending(self) -> int:
        """Blocks submitted and not yet handed back."""
        return len(self._queue)


def make_decoder(mode: str, vae: WanVAE, device: torch.device, ckpt_dir=None, tiny_path=None):
    """The streaming decoder of the plan's `vae_decode`: "frame" (the Wan VAE, the reference's bits), "fast"
    (DecodeOptions.fast(), CUDA graphs on the GPU: tools/bench_vae.py measured 76 vs 179 ms per 704x384 block on
    the H200, SQNR 38.6 dB against the exact bf16 path), "lean" (DecodeOptions.lean(), no graphs: less memory) or
    "tiny" (TAEHV, weights from the checkpoint folder or `tiny_path`; quality unmeasured here)."""
    if mode == "tiny":
        from lowvram.model.taehv import TinyStreamingDecoder, find_taehv_weights, load_taehv

        return TinyStreamingDecoder(load_taehv(find_taehv_weights(ckpt_dir, tiny_path), device, vae.dtype))
    if mode == "fast":
        cls = GraphedDecoder if torch.device(device).type == "cuda" else StreamingDecoder
        return cls(vae, DecodeOptions.fast())
    if mode == "lean":
        return StreamingDecoder(vae, DecodeOptions.lean())
    return StreamingDecoder(vae)
