"""wav2vec2 audio features and their bucketing to video frames, as LiveAvatar does it (docs/model.md §6.1).

`AudioEncoder.hidden_states` runs transformers' `Wav2Vec2Model` on a 16 kHz mono wave and
stacks all L+1 hidden states (embedding output + each layer; 25 for the real model) at 50
frames per second. `bucket_audio_features` resamples them linearly to 30 fps and gives video
frame i (at 25 fps) the 30-fps feature at round(i * 30 / 25), zeros past the audio's end,
for a whole number of clips.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Model

from lowvram.constants import AUDIO_RATE, WAV2VEC_DIR
from lowvram.errors import CheckpointError, LowvramError
from lowvram.io.hf_folders import check_json_files, first_line, quiet_transformers
from lowvram.quantize.shards import read_header

FEATURE_FPS = 50  # wav2vec2: one frame per 320 samples
RESAMPLE_FPS = 30  # LiveAvatar's intermediate rate (its `video_rate`)
MIN_SAMPLES = 400  # the conv stack's receptive field: shorter audio gives no frame


class AudioEncoder:
    """wav2vec2 feature extractor + model; `hidden_states` gives [L+1, T50, D]."""

    def __init__(self, model: Wav2Vec2Model, feature_extractor: Wav2Vec2FeatureExtractor, device: torch.device,
                 dtype: torch.dtype):
        self.model, self.feature_extractor = model, feature_extractor
        self.device, self.dtype = torch.device(device), dtype

    @property
    def num_hidden_states(self) -> int:
        return self.model.config.num_hidden_layers + 1

    @torch.no_grad()  # not inference_mode: callers may write into what comes back
    def hidden_states(self, wave: np.ndarray) -> torch.Tensor:
        """All hidden states of a float32 mono 16 kHz wave, stacked: [L+1, T50, D] in the model's dtype."""
        wave = np.asarray(wave)
        if wave.ndim != 1:
            raise LowvramError(f"audio must be one mono channel, got an array of shape {wave.shape}; mix it down")
        if wave.shape[0] < MIN_SAMPLES:
            raise LowvramError(f"audio is {wave.shape[0]} samples long; wav2vec2 needs at least {MIN_SAMPLES} "
                               f"({MIN_SAMPLES / AUDIO_RATE * 1000:.0f} ms at 16 kHz)")
        if not np.isfinite(wave).all():
            raise LowvramError("audio contains NaN or infinite samples; re-encode the file")
        # zero-mean unit-variance per preprocessor_config.json (do_normalize)
        x = self.feature_extractor(wave.astype(np.float32), sampling_rate=AUDIO_RATE,
                                   return_tensors="pt").input_values  # [1, S]
        return self.hidden_states_normalized(x[0])

    @torch.no_grad()
    def hidden_states_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states [L+1, T50, D] of an already normalised wave x [S] (lowvram.pipeline.audio_features' windows)."""
        dev = next(self.model.parameters()).device
        out = self.model(x[None].to(dev, self.dtype), output_hidden_states=True)
        # LiveAvatar ran transformers <= 4.51, whose last hidden state is the encoder's output after its
        # final LayerNorm; transformers 5 returns the last layer's output before it. The inputs of the
        # layers agree, so take those and append last_hidden_state: the same L+1 states under both.
        states = (*out.hidden_states[:-1], out.last_hidden_state)
        return torch.cat(states)  # L+1 x [1, T50, D] -> [L+1, T50, D]


def _sample_indices(src_fps: int, total: int, dst_fps: int, count: int) -> np.ndarray:
    """Indices into a `src_fps` sequence of `count` frames at `dst_fps`, from time 0 (LiveAvatar's rounding)."""
    duration = count / dst_fps
    t = np.linspace(0.0, duration, count, endpoint=False)  # [count] seconds
    return np.clip(np.round(t * src_fps).astype(int), 0, total - 1)


def bucket_audio_features(hidden: torch.Tensor, video_fps: int = 25,
                          clip_frames: int = 48) -> tuple[torch.Tensor, int]:
    """Per-video-frame audio features for whole clips.

    hidden: [L+1, T50, D] wav2vec2 hidden states at 50 fps. Returns (audio_emb [1, L+1, D, N]
    float32, num_clips) with N = num_clips * clip_frames; frames past the audio are zeros.
    """
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be [L+1, T50, D], got shape {tuple(hidden.shape)}")
    n_states, t50, dim = hidden.shape
    t30 = int(t50 / float(FEATURE_FPS) * RESAMPLE_FPS)
    if t30 < 1:
        raise LowvramError(f"audio gives {t50} wav2vec2 frames, too short to drive one video frame; "
                           "use at least 40 ms of audio")
    # linear resampling 50 -> 30 fps, end points aligned; layers act as the batch
    feat = F.interpolate(hidden.transpose(1, 2), size=t30, mode="linear", align_corners=True)  # [L+1, D, T30]
    feat = feat.float()
    scale = RESAMPLE_FPS / video_fps
    num_clips = int(t30 / (clip_frames * scale)) + 1
    n = num_clips * clip_frames
    padded = math.ceil(n / video_fps * RESAMPLE_FPS)  # the 30-fps length the clips span
    idx = torch.from_numpy(_sample_indices(RESAMPLE_FPS, padded, video_fps, n)).to(feat.device)  # [N]
    picked = feat[:, :, idx.clamp(max=t30 - 1)]  # [L+1, D, N]
    out = torch.where(idx < t30, picked, torch.zeros((), dtype=feat.dtype, device=feat.device))
    return out.unsqueeze(0), num_clips


def load_audio_encoder(ckpt_dir: str | Path, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> AudioEncoder:
    """Load `<ckpt_dir>/wav2vec2-large-xlsr-53-english` (config, weights, preprocessor) onto `device`.

    LiveAvatar runs it in bf16 on the GPU; float32 is the choice on the CPU. The CTC head, if
    the folder holds one, is not loaded: only hidden states are used. Every file is checked so that
    a damaged or mismatched one is named (CheckpointError), never loaded as random weights.
    """
    folder, device = Path(ckpt_dir) / WAV2VEC_DIR, torch.device(device)
    what = f"the {WAV2VEC_DIR} folder"
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is missing; copy the {WAV2VEC_DIR} folder of Wan2.2-S2V-14B")
    for name in ("config.json", "preprocessor_config.json"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name} is missing; re-download {what}")
    check_json_files(folder, what)
    fe = _load_part(Wav2Vec2FeatureExtractor.from_pretrained, folder / "preprocessor_config.json", what)
    if fe.sampling_rate != AUDIO_RATE:
        raise CheckpointError(f"{folder / 'preprocessor_config.json'} says sampling_rate {fe.sampling_rate}; "
                              f"the model needs {AUDIO_RATE}")
    cfg = _load_part(Wav2Vec2Config.from_pretrained, folder / "config.json", what)
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder} holds no loadable wav2vec2 weights (none of {', '.join(WEIGHT_FILES)}); "
                              f"re-download {what}")
    if weights.suffix == ".safetensors":
        read_header(weights)  # a damaged file is named here, not inside transformers
    try:  # the folder holds a CTC model (as LiveAvatar loads it); only its wav2vec2 body is kept
        with quiet_transformers():
            ctc, info = Wav2Vec2ForCTC.from_pretrained(folder, config=cfg, dtype=dtype, output_loading_info=True,
                                                       ignore_mismatched_sizes=True)  # checked below, with names
    except Exception as e:  # transformers raises many types for a file that does not fit its config
        raise CheckpointError(f"{weights} does not load as the wav2vec2 of {folder / 'config.json'} "
                              f"({first_line(e)}); re-download {what}") from None
    _check_loading_info(info, weights, folder, what)
    model = ctc.wav2vec2
    model.to(device).eval().requires_grad_(False)
    return AudioEncoder(model, fe, device, dtype)


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_UNUSED = ("wav2vec2.masked_spec_embed",)  # only used to mask inputs in training


def _load_part(load, path: Path, what: str):
    try:
        with quiet_transformers():
            return load(path.parent)
    except Exception as e:  # transformers' validation raises TypeError, ValueError, its own errors...
        raise CheckpointError(f"{path} does not hold a usable wav2vec2 setting ({first_line(e)}); "
                              f"re-download {what}") from None


def _check_loading_info(info: dict, weights: Path, folder: Path, what: str) -> None:
    """Weights transformers would silently initialise at random (or drop) mean the wrong files."""
    mismatched = [m for m in info.get("mismatched_keys") or () if str(m[0] if isinstance(m, tuple) else m)
                  .startswith("wav2vec2.")]  # the CTC head is not used
    if mismatched:
        first = sorted(mismatched, key=str)[0]  # a key, or (key, stored shape, model shape)
        key, stored, wanted = (list(first) + [None, None])[:3] if isinstance(first, tuple) else (first, None, None)
        shapes = f": {list(stored)} in the file, {list(wanted)} for the config" if stored and wanted else ""
        raise CheckpointError(f"{weights} holds {len(mismatched)} tensor(s) of other shapes than "
                              f"{folder / 'config.json'} says, e.g. {key}{shapes}; re-download {what}")
    missing = [k for k in info.get("missing_keys", ()) if k.startswith("wav2vec2.") and k not in _UNUSED]
    if missing:
        raise CheckpointError(f"{weights} lacks {len(missing)} wav2vec2 tensor(s) such as {sorted(missing)[0]}; "
                              f"it is not the model {folder / 'config.json'} describes: re-download {what}")
    extra = [k for k in info.get("unexpected_keys", ()) if k.startswith("wav2vec2.encoder.layers.")]
    if extra:
        raise CheckpointError(f"{weights} holds tensors {folder / 'config.json'} has no place for, such as "
                              f"{sorted(extra)[0]}; re-download {what}")
