"""The writer rank's half of a block: decode the clean latents, stream the frames into the mp4.

Exactly the single-GPU rule (lowvram.pipeline.session): the same VideoWriter (fragmented mp4, one
fragment per block, partial name renamed on close) behind the same BackgroundWriter (the encoder on its
own thread), the first DROPPED_FRAMES generated frames dropped, the audio track from `muxed_audio`. With online decode it keeps clip 0's latents and frames and makes the refreshed sink's
ref + motion latents (`refresh_latents`). After each block the launcher is told through the store
(`written`, `event`), which drives its progress display and on_block.
"""

from __future__ import annotations

import json
import time

import torch

from lowvram.constants import AUDIO_RATE, BLOCKS_PER_CLIP, DROPPED_FRAMES, FPS
from lowvram.pipeline.encode import muxed_audio, reencode_motion
from lowvram.runtime.schedule import block_of


class BlockWriter:
    def __init__(self, opts, inputs, clips: int, decode, vae, store, device: torch.device, t0: float,
                 progress=None, headline: str = ""):
        from lowvram.io.video_writer import VideoWriter
        from lowvram.io.writer_thread import BackgroundWriter

        self.opts, self.inputs, self.clips, self.decode, self.vae = opts, inputs, clips, decode, vae
        self.store, self.device, self.t0, self.progress = store, device, t0, progress
        self.total = clips * BLOCKS_PER_CLIP
        self.frames = self.blocks = 0
        self.vae_s = self.write_s = 0.0
        self.first_frame_s = None
        self.block_s: list[float] = []  # seconds since generation began when each block was written
        self.t_start = time.time()
        self._clip0: list[tuple[torch.Tensor, torch.Tensor]] = []  # (latents, frames) of clip 0 (online decode)
        self.video = BackgroundWriter(VideoWriter(str(opts.out), inputs.width, inputs.height, fps=FPS,
                                                  audio=muxed_audio(inputs.wave, clips), audio_rate=AUDIO_RATE,
                                                  final=not opts.partial_out))  # encodes beside the decode
        start = {"total_blocks": self.total, "clips": clips, "headline": headline}
        store.set("start", json.dumps(start))
        if progress is not None:
            progress.start(**start)

    def write(self, g: int, latents: torch.Tensor) -> None:
        """Decode block g's clean latents [1, 16, 3, h, w] and append its frames to the mp4."""
        idx = block_of(g)
        t0 = time.perf_counter()
        video = self.decode(latents)                                             # [3, 12, H, W]
        if g == 0:
            video = video[:, DROPPED_FRAMES:]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # orders: the decode's kernels before the clock reads
        t1 = time.perf_counter()
        self.frames += self.video.write(video)
        t2 = time.perf_counter()
        self.vae_s, self.write_s = self.vae_s + t1 - t0, self.write_s + t2 - t1
        if self.first_frame_s is None:
            self.first_frame_s = time.time() - self.t0
        self.blocks += 1
        if self.opts.online_decode and idx.clip == 0 and self.clips > 1:
            self._clip0.append((latents, video.float().cpu()))
        peak = torch.cuda.max_memory_reserved(self.device) if self.device.type == "cuda" else 0
        seconds = time.time() - self.t_start
        self.block_s.append(round(seconds, 4))
        event = {"clip": idx.clip, "block": idx.block, "blocks_done": self.blocks, "blocks_total": self.total,
                 "frames": self.frames, "seconds": round(seconds, 4), "peak_vram_bytes": peak,
                 "path": str(self.video.partial_path or self.opts.out)}
        self.store.set("event", json.dumps(event))
        self.store.add("written", 1)
        if self.progress is not None:
            self.progress.block_done(idx.clip, idx.block, self.frames, seconds, peak)

    def refresh_latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The online-decode sink after clip 0 (as lowvram.pipeline.session): the first generated latent as the
        ref, and the motion latents re-encoded with clip 0's frames rolled in. CPU tensors, for the broadcast."""
        ref = torch.cat([lat for lat, _ in self._clip0], dim=2)[:, :, :1]
        frames = torch.cat([f for _, f in self._clip0], dim=1).to(self.device)
        motion = reencode_motion(self.vae, self.inputs.image.to(self.device), frames)
        self._clip0 = []
        return ref.cpu().contiguous(), motion.cpu().contiguous()

    def close(self, failed: bool = False) -> None:
        """Finish the mp4: renamed into place after a whole or stopped run (as the single-GPU path), left under
        its partial name when the run failed (it still holds every finished block, playable)."""
        if getattr(self, "closed", False):
            return
        self.closed = True
        self.kept = self.video.abandon() if failed else self.video.close()
        if self.progress is not None:
            self.progress.finish()
            self.progress = None
