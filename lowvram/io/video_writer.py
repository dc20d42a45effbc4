"""Streaming MP4 output: H.264 video and AAC audio muxed block by block with PyAV.

The file is fragmented MP4 written straight to its final path: each `write()` call starts a
new key frame and so a new fragment, and a fragment reaches the disk as soon as the next one
begins. A process killed mid-run leaves a playable file that lacks at most the frames of its
last `write()` call. With audio, the muxer holds video back until the AAC encoder (which lags
its input by about two 1024-sample frames) has packets at least as late, so writes shorter than
~0.2 s (at 16 kHz) can lose a few more frames: measured, 1-frame writes lose 6 and 5-frame
writes 10, against 1 and 5 without audio. Encoder settings follow the reference's `save_video`
(libx264, yuv420p, imageio quality 8 = crf 10) and `merge_video_audio` (AAC at up to
192 kb/s, `-shortest`).
"""

from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np
import torch

from lowvram.errors import LowvramError

CRF = 10  # imageio's quality=8 maps to crf int((1 - 8/10) * 51) = 10 for libx264
AUDIO_BITRATE = 192_000
# delay_moov: the (sample-less) moov is written with the first fragment, so the AAC encoder
# delay goes into an edit list instead of shifting every track's timestamps.
MOVFLAGS = "frag_keyframe+empty_moov+delay_moov+default_base_moof"


def check_output_path(path: str) -> None:
    """Fail early (before any model loads) if the video cannot be written at `path`."""
    path = os.fspath(path)
    if not path.lower().endswith(".mp4"):
        raise LowvramError(f"--out must be an .mp4 file path, got {path!r}")
    if os.path.isdir(path):
        raise LowvramError(f"--out {path} is a directory; give a file path ending in .mp4")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise LowvramError(
            f"output folder {folder} does not exist; create it or choose another --out")
    if not os.access(folder, os.W_OK):
        raise LowvramError(f"output folder {folder} is not writable; choose another --out")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise LowvramError(f"output file {path} exists and is not writable; choose another --out")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Video in [-1, 1] -> uint8 frames, exactly as the reference's `save_video`.

    x: [3, T, H, W] or [1, 3, T, H, W], any float dtype. Returns [T, H, W, 3] uint8 (same device).
    In float32 (the reference's VAE decode ends in `.float()`): clamp, (x + 1) / 2, * 255, then
    truncation by the integer cast (no rounding).
    """
    if x.dim() == 5:
        if x.shape[0] != 1:
            raise ValueError(f"to_uint8 takes one video, got a batch of {x.shape[0]}")
        x = x[0]
    if x.dim() != 4 or x.shape[0] != 3 or not x.is_floating_point():
        raise ValueError(
            f"to_uint8 expects a float [3, T, H, W] tensor, got {x.dtype} {list(x.shape)}")
    x = x.float().clamp(-1, 1)
    x = x.sub(-1).div(2)  # x: [3, T, H, W] in [0, 1]
    return (x.permute(1, 2, 3, 0) * 255).type(torch.uint8)  # [T, H, W, 3]


class VideoWriter:
    """Encode frames to an MP4 as they are produced, with optional audio.

    VideoWriter(path, width, height, fps=25, audio=None, audio_rate=16000, crf=10)
    - audio: mono float32 [S] at `audio_rate` Hz, muxed from t=0 as far as the video reaches.
      Like ffmpeg's `-shortest`, frames that would start after the audio ends are dropped and
      audio past the last frame is cut.
    - write(frames): uint8 [T, H, W, 3] (numpy or torch) or a float torch [3, T, H, W] in
      [-1, 1]; returns how many frames were kept.
    - close(): flush the encoders and finish the file; a file with no frames is removed.
    Use as a context manager; the file is finished even if the block raises.
    """

    def __init__(self, path, width: int, height: int, fps: int = 25,
                 audio: np.ndarray | None = None, audio_rate: int = 16000, crf: int = CRF):
        check_output_path(path)
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(
                f"yuv420p needs a positive even width and height, got {width}x{height}")
        self.path = os.fspath(path)
        self.width, self.height, self.fps = int(width), int(height), int(fps)
        self.frames_written = 0
        self._closed = False
        self._audio = None
        if audio is not None:
            audio = np.asarray(audio, dtype=np.float32).reshape(-1)
            if audio.size == 0:
                raise ValueError("audio is empty; pass None for a silent video")
            self._audio = audio
        self._audio_rate = int(audio_rate)
        self._audio_pos = 0  # samples already sent to the AAC encoder
        self._touched = False  # PyAV creates the file on the first mux, not in av.open

        self._out = av.open(self.path, "w", format="mp4",
                            container_options={"movflags": MOVFLAGS, "flush_packets": "1"})
        self._video = self._out.add_stream("libx264", rate=self.fps)
        self._video.width, self._video.height = self.width, self.height
        self._video.pix_fmt = "yuv420p"
        self._video.codec_context.time_base = Fraction(1, self.fps)
        # zerolatency: no B-frames and no lookahead, so each frame's packet comes out at once
        # and a block's fragment can close as soon as the next block starts.
        self._video.codec_context.options = {
            "crf": str(int(crf)), "preset": "medium", "tune": "zerolatency",
            "x264-params": "keyint=12:min-keyint=1:scenecut=0",
        }
        self._astream = None
        if self._audio is not None:
            self._astream = self._out.add_stream("aac", rate=self._audio_rate, layout="mono")
            # the native AAC encoder allows at most 6 bits per sample per channel
            self._astream.bit_rate = min(AUDIO_BITRATE, 6 * self._audio_rate)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _as_uint8(self, frames) -> np.ndarray:
        if isinstance(frames, torch.Tensor):
            frames = to_uint8(frames) if frames.is_floating_point() else frames
            frames = frames.cpu().numpy()
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(
                f"frames must be uint8 [T, {self.height}, {self.width}, 3], "
                f"got {frames.dtype} {list(frames.shape)}")
        return frames

    def write(self, frames) -> int:
        """Encode and mux `frames` now; they start a new fragment. Returns frames kept."""
        if self._closed:
            raise ValueError("write() on a closed VideoWriter")
        frames = self._as_uint8(frames)  # frames: [T, H, W, 3] uint8
        if self._audio is not None:
            # -shortest: keep frame i only if it starts before the audio ends
            limit = -(-self._audio.size * self.fps // self._audio_rate)
            frames = frames[: max(0, limit - self.frames_written)]
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame = frame.reformat(format="yuv420p", interpolation="BICUBIC")
            frame.pts = self.frames_written
            if i == 0:
                frame.pict_type = av.video.frame.PictureType.I  # new block -> new fragment
            self._touched = True
            self._out.mux(self._video.encode(frame))
            self.frames_written += 1
        self._feed_audio(self._video_samples())
        return len(frames)

    def _video_samples(self) -> int:
        """Audio samples covered by the frames written so far."""
        return self.frames_written * self._audio_rate // self.fps

    def _feed_audio(self, upto: int) -> None:
        if self._astream is None:
            return
        upto = min(upto, self._audio.size)
        if upto <= self._audio_pos:
            return
        chunk = self._audio[self._audio_pos:upto]  # chunk: [S]
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
        frame.sample_rate = self._audio_rate
        frame.pts = self._audio_pos
        frame.time_base = Fraction(1, self._audio_rate)
        self._out.mux(self._astream.encode(frame))
        self._audio_pos = upto

    def close(self) -> None:
        """Flush both encoders and write the trailer. Removes the file if no frame was written."""
        if self._closed:
            return
        self._closed = True
        if self.frames_written == 0:
            self._out.close()
            if self._touched and os.path.exists(self.path):
                os.remove(self.path)
            return
        try:
            self._out.mux(self._video.encode(None))
            if self._astream is not None:
                self._feed_audio(self._video_samples())  # audio stops where the video stops
                self._out.mux(self._astream.encode(None))
        finally:
            self._out.close()  # trailer: the file stays valid even if a flush above failed
