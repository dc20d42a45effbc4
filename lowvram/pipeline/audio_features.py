"""Per-clip audio features for any length of audio, with memory bounded by a window.

Up to `WHOLE_FILE_SECONDS` the whole file goes through wav2vec2 at once and is bucketed exactly as
LiveAvatar does (docs/model.md §6.1). Longer audio (a 10,000-second video is a supported case) would need
tens of GB for the hidden states and an attention over hundreds of thousands of frames, so it runs in
windows: `WINDOW_SECONDS` of audio plus `CONTEXT_SECONDS` on each side, normalised with the whole
file's mean and variance (as the feature extractor normalises the whole file), and each window's
clips are bucketed with the whole file's 50 -> 30 -> 25 fps index map. The window's features are
kept until its clips are generated; the encoder waits on the CPU between windows. Windowed features
differ slightly from a whole-file pass (wav2vec2's attention sees only the window and its context).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lowvram.constants import AUDIO_RATE
from lowvram.model.audio_encoder import FEATURE_FPS, RESAMPLE_FPS, _sample_indices, bucket_audio_features

HOP = 320             # samples per wav2vec2 frame (50 fps)
RECEPTIVE = 400       # samples the conv stack needs for its first frame
WHOLE_FILE_SECONDS = 120.0
WINDOW_SECONDS = 60.0
CONTEXT_SECONDS = 10.0


def frames_of(samples: int) -> int:
    """wav2vec2 output frames for a number of samples (conv stack: 400-sample field, 320 hop)."""
    return 0 if samples < RECEPTIVE else (samples - RECEPTIVE) // HOP + 1


class ClipAudio:
    """`clip(r)` -> [1, L+1, D, clip_frames] float32 features of clip r; `num_clips` as the reference."""

    def __init__(self, encoder, wave: np.ndarray, device, video_fps: int = 25, clip_frames: int = 48,
                 whole_file_seconds: float = WHOLE_FILE_SECONDS, window_seconds: float = WINDOW_SECONDS,
                 context_seconds: float = CONTEXT_SECONDS):
        self.fps, self.clip_frames, self.device = video_fps, clip_frames, torch.device(device)
        self.windowed = wave.shape[0] > whole_file_seconds * AUDIO_RATE
        if not self.windowed:
            enc = encoder()
            hidden = enc.hidden_states(wave)
            self._all, self.num_clips = bucket_audio_features(hidden.float().cpu(), video_fps, clip_frames)
            return
        self.encoder, self.wave = encoder(device="cpu"), wave
        self.stats = (float(wave.mean()), float(np.sqrt(wave.var() + 1e-7)))
        self.t50 = frames_of(wave.shape[0])
        self.t30 = int(self.t50 / float(FEATURE_FPS) * RESAMPLE_FPS)
        scale = RESAMPLE_FPS / video_fps
        self.num_clips = int(self.t30 / (clip_frames * scale)) + 1
        n = self.num_clips * clip_frames
        self.idx = _sample_indices(RESAMPLE_FPS, math.ceil(n / video_fps * RESAMPLE_FPS), video_fps, n)  # [N] 30-fps
        self.clips_per_window = max(1, int(window_seconds * video_fps) // clip_frames)
        self.context = int(context_seconds * FEATURE_FPS)
        self._window = (-1, None)

    def clip(self, r: int) -> torch.Tensor:
        if not self.windowed:
            return self._all[..., r * self.clip_frames:(r + 1) * self.clip_frames]
        w = r // self.clips_per_window
        if self._window[0] != w:
            self._window = (w, self._compute_window(w))
        first = w * self.clips_per_window
        k = r - first
        return self._window[1][..., k * self.clip_frames:(k + 1) * self.clip_frames]

    def _compute_window(self, w: int) -> torch.Tensor:
        """Features of the clips of window w: [1, L+1, D, clips_per_window * clip_frames]."""
        f0 = w * self.clips_per_window * self.clip_frames
        f1 = min(self.num_clips * self.clip_frames, f0 + self.clips_per_window * self.clip_frames)
        j = torch.from_numpy(self.idx[f0:f1])                                    # 30-fps indices
        valid = j < self.t30
        pos = j.clamp(max=self.t30 - 1).double() * ((self.t50 - 1) / max(self.t30 - 1, 1))  # align_corners
        i0 = pos.floor().long()
        lam = (pos - i0).float()
        a = max(0, int(i0.min()) - self.context)
        b = min(self.t50, int(i0.max()) + 2 + self.context)                      # 50-fps frames [a, b)
        seg = self.wave[a * HOP: (b - 1) * HOP + RECEPTIVE]
        mean, std = self.stats
        x = torch.from_numpy(((seg - mean) / std).astype(np.float32))
        self.encoder.model.to(self.device)
        try:
            hidden = self.encoder.hidden_states_normalized(x).float().cpu()     # [L+1, b-a, D]
        finally:
            self.encoder.model.to("cpu")
        lo = (i0 - a).clamp(0, hidden.shape[1] - 1)
        hi = (i0 + 1 - a).clamp(0, hidden.shape[1] - 1)
        feat = hidden[:, lo] * (1 - lam)[None, :, None] + hidden[:, hi] * lam[None, :, None]  # [L+1, F, D]
        feat = torch.where(valid[None, :, None], feat, torch.zeros(()))
        return feat.transpose(1, 2).unsqueeze(0)                                  # [1, L+1, D, F]
