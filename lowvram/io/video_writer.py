"""Streaming MP4 output: H.264 video and AAC audio muxed block by block with PyAV.

The file is fragmented MP4: each `write()` call starts a new key frame and so a new fragment, and a
fragment reaches the disk as soon as the next one begins. With audio, the muxer holds video back until
the AAC encoder (which lags its input by about two 1024-sample frames) has packets at least as late, so
writes shorter than ~0.2 s (at 16 kHz) can lose a few more frames: measured, 1-frame writes lose 6 and
5-frame writes 10, against 1 and 5 without audio. Encoder settings follow the reference's `save_video`
(libx264, yuv420p, imageio quality 8 = crf 10) and `merge_video_audio` (AAC at up to 192 kb/s, `-shortest`).

What happens to the file on each kind of stop (final=True, the default):
- The frames go to `partial_path`, `.<name>.partial-<pid>.mp4` beside `path`; `path` is not touched.
- `close()` (the end of the video, and a stop the caller asked for at a block boundary: Ctrl-C/SIGTERM
  caught as a flag) finishes the file and renames it to `path`, replacing a file of that name at once.
- `abandon()` (the run failed; also what leaving a `with` block by an exception does) finishes the file
  but leaves it under `partial_path`: an existing `path` survives a failed run.
- SIGKILL or a crash: `partial_path` stays, and every block but the one in flight is playable.
- A write error (disk full, I/O error): the partial file is cut back to its last complete fragment and a
  `VideoWriteError` says where it is and how much it holds.
A lock beside `path` (lowvram.io.locks) keeps a second writer of the same `path` out.
"""

from __future__ import annotations

import errno
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from lowvram.errors import LowvramError
from lowvram.io.locks import holds_lock, lock_output
from lowvram.io.mp4frag import count_frames, truncate_to_fragments
from lowvram.io.partials import free_partial_path

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



class VideoWriteError(LowvramError):
    """The disk refused a write; the partial file was cut back to its last complete block.

    partial_path: the kept file (None when no complete block had reached the disk); frames, seconds: in it.
    """

    def __init__(self, message: str, partial_path: Path | None, frames: int, seconds: float):
        super().__init__(message)
        self.partial_path, self.frames, self.seconds = partial_path, frames, seconds


class _DiskFile:
    """The file PyAV writes through (as a Python file object): created at the first byte, every write
    completed (a short write on a nearly full disk is finished or fails), and after the first failure no
    further byte is written, so the file ends where the disk stopped it."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None
        self.created = False
        self.error: OSError | None = None

    def write(self, data) -> int:
        if self.error is not None:
            raise self.error
        view = memoryview(data).cast("B")
        try:
            if self.fd is None:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                self.created = True
            done = 0
            while done < len(view):
                done += _write(self.fd, view[done:])
        except OSError as e:
            self.error = e
            raise
        return len(view)

    def close(self, sync: bool = False) -> None:
        if self.fd is None:
            return
        try:
            if sync and self.error is None:
                os.fsync(self.fd)  # the bytes are on the disk before the rename makes them the final file
        finally:
            os.close(self.fd)
            self.fd = None


def _write(fd: int, view: memoryview) -> int:
    return os.write(fd, view)  # the one place bytes reach the disk (tests inject ENOSPC here)


class ClosesOrAbandons:
    """As a context manager: close() on a normal exit, abandon() when the block raises."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


class VideoWriter(ClosesOrAbandons):
    """Encode frames to an MP4 as they are produced, with optional audio.

    VideoWriter(path, width, height, fps=25, audio=None, audio_rate=16000, crf=10, final=True)
    - audio: mono float32 [S] at `audio_rate` Hz, muxed from t=0 as far as the video reaches.
      Like ffmpeg's `-shortest`, frames that would start after the audio ends are dropped and
      audio past the last frame is cut.
    - final=True: `path` is the final name; frames go to `partial_path` beside it until close()
      renames it (module docstring). final=False: frames go straight to `path` (= `partial_path`).
    - write(frames): uint8 [T, H, W, 3] (numpy or torch) or a float torch [3, T, H, W] in
      [-1, 1]; returns how many frames were kept. A disk error raises `VideoWriteError`.
    - close() -> path: finish the file and rename it into place; a file with no frames is removed
      and `path` is left as it was (returns None).
    - abandon() -> partial_path: finish the file and leave it under `partial_path` (a failed run);
      never raises, returns None when no frame was written.
    As a context manager: close() on a normal exit, abandon() when the block raises.
    The writer holds the output's lock (lowvram.io.locks) unless this process took it already.
    """

    def __init__(self, path, width: int, height: int, fps: int = 25,
                 audio: np.ndarray | None = None, audio_rate: int = 16000, crf: int = CRF,
                 final: bool = True):
        check_output_path(path)
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(
                f"yuv420p needs a positive even width and height, got {width}x{height}")
        self.path = Path(path)
        self.final = bool(final)
        self.partial_path = free_partial_path(self.path) if self.final else self.path
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
        self._lock = None if holds_lock(self.path) else lock_output(self.path)
        self._file = _DiskFile(self.partial_path)  # nothing is created before the first frame
        try:
            self._open_container(crf)
        except BaseException:
            self._release()
            raise

    def _open_container(self, crf: int) -> None:
        self._out = av.open(self._file, "w", format="mp4",
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

    def kept(self, n: int) -> int:
        """How many of n new frames are kept: like ffmpeg's -shortest, frame i is kept only if it starts
        before the audio ends."""
        if self._audio is None:
            return n
        limit = -(-self._audio.size * self.fps // self._audio_rate)
        return max(0, min(n, limit - self.frames_written))

    def write(self, frames) -> int:
        """Encode and mux `frames` now; they start a new fragment. Returns frames kept."""
        if self._closed:
            raise ValueError("write() on a closed VideoWriter")
        frames = self._as_uint8(frames)  # frames: [T, H, W, 3] uint8
        frames = frames[: self.kept(len(frames))]
        try:
            for i, rgb in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                frame = frame.reformat(format="yuv420p", interpolation="BICUBIC")
                frame.pts = self.frames_written
                if i == 0:
                    frame.pict_type = av.video.frame.PictureType.I  # new block -> new fragment
                self._out.mux(self._video.encode(frame))
                self.frames_written += 1
            self._feed_audio(self._video_samples())
        except Exception:
            if self._file.error is not None:
                self._fail()  # raises VideoWriteError
            raise
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

    def _finish(self) -> None:
        """Flush both encoders and write the trailer: the file is complete under `partial_path`."""
        try:
            self._out.mux(self._video.encode(None))
            if self._astream is not None:
                self._feed_audio(self._video_samples())  # audio stops where the video stops
                self._out.mux(self._astream.encode(None))
        finally:
            self._out.close()  # trailer: the file stays valid even if a flush above failed

    def _begin_close(self) -> bool:
        """Mark the writer closed; False when there is nothing to finish (closed already, or no frame was
        written: then the empty file is discarded)."""
        if self._closed:
            return False
        self._closed = True
        if self.frames_written == 0:
            self._discard()
            return False
        return True

    def close(self) -> Path | None:
        """Finish the file and (final=True) rename it to `path`. Returns `path`, or None if no frame was
        written (then nothing is created and an existing `path` is left as it was)."""
        if not self._begin_close():
            return None
        try:
            self._finish()
        except Exception:
            if self._file.error is not None:
                self._fail()
            self._file.close()
            self._release()
            raise
        try:
            self._file.close(sync=True)
            if self.final:
                os.replace(self.partial_path, self.path)
        except OSError as e:
            self._release()
            raise LowvramError(f"cannot put the finished video in place at {self.path} ({e.strerror}); "
                               f"it is complete at {self.partial_path}") from None
        self._release()
        return self.path

    def abandon(self) -> Path | None:
        """Finish the file but keep it under `partial_path` (the run failed); never raises.
        Returns `partial_path`, or None if no frame was written (then nothing is left)."""
        if not self._begin_close():
            return None
        try:
            self._finish()
        except Exception:  # abandon runs while another error propagates: keep what is whole, say nothing
            pass
        self._file.close()
        if self._file.error is not None:
            kept = _cut_back(self.partial_path)
        else:
            kept = True
        self._release()
        return self.partial_path if kept else None

    def _discard(self) -> None:
        try:
            self._out.close()
        except Exception:  # nothing was muxed: there is no trailer to write
            pass
        self._file.close()
        if self._file.created:  # a header without frames: not a video
            _remove(self.partial_path)
        self._release()

    def _fail(self) -> None:
        """A write failed: cut the file back to its last complete fragment, close, raise VideoWriteError."""
        err = self._file.error
        self._closed = True
        try:
            self._out.close()
        except Exception:  # the trailer cannot be written either; the fragments before it are whole
            pass
        self._file.close()
        kept = _cut_back(self.partial_path)
        frames = count_frames(self.partial_path) if kept else 0
        seconds = frames / self.fps
        self._release()
        why = err.strerror or str(err)
        hint = "free space on that disk" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "check the disk"
        kept_path = self.partial_path if kept else None
        untouched = f"; {self.path} was not changed" if self.final else ""
        if kept:
            msg = (f"cannot write the video ({why}): the first {frames} frames ({seconds:.1f} s) are kept, "
                   f"playable, in {self.partial_path}{untouched}; {hint} and run again")
        else:
            msg = (f"cannot write the video ({why}) at {self.partial_path}: no complete block had reached the "
                   f"disk, so nothing was kept{untouched}; {hint} and run again")
        raise VideoWriteError(msg, kept_path, frames, seconds) from None

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _cut_back(path: Path) -> bool:
    """Truncate a failed file to its last complete fragment; True if something playable is left."""
    try:
        if truncate_to_fragments(path) > 0:
            return True
    except OSError:  # the file cannot even be truncated: it is not worth keeping
        pass
    _remove(path)
    return False


def _remove(path: Path) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
