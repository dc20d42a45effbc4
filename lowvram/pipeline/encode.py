"""The conditioning of a video: the umT5 prompt embedding (disk-cached), the wav2vec2 features per clip,
and the VAE latents of the portrait (the reference latent and the motion latents).

A/V sync (docs/model.md §8.2): the reference drops the first 3 generated frames but muxes audio from
t = 0, so its video leads its audio by 120 ms. Generated frame k is driven by the audio at k/25 s, so
`muxed_audio` drops the first 120 ms of audio too: video frame 0 and audio t = 0 line up.
"""

from __future__ import annotations

import gc

import numpy as np
import torch

from lowvram.constants import (
    AUDIO_RATE,
    CLIP_FRAMES,
    DROPPED_FRAMES,
    FPS,
    FRAMES_PER_BLOCK,
    MOTION_FRAMES,
    VIDEO_FRAMES_PER_LATENT,
)
from lowvram.io import prompt_cache
from lowvram.runtime.schedule import BlockIndex, output_frames

REF_REPEAT = 5  # the single-GPU reference encodes the ref image repeated 5 times
MOTION_LATENTS = (MOTION_FRAMES + 3) // 4  # 19: what FramePack reads


def free_memory() -> None:
    """Return the memory of models the caller has just dropped (`del`) to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def encode_prompt(ckpt, prompt: str, device, t5_mode: str, log=print) -> torch.Tensor:
    """[L, text_dim] umT5 embedding of the prompt, from the disk cache when it is there.

    t5_mode "cpu" runs the bf16 encoder on the CPU (the cache key is that of bf16). A cache hit imports
    nothing of umT5 (transformers' UMT5 modules take seconds to import)."""
    quant = "bf16" if t5_mode == "cpu" else t5_mode
    device = torch.device("cpu") if t5_mode == "cpu" else torch.device(device)
    key = prompt_cache.prompt_key(prompt, ckpt.t5, quant)
    ctx = prompt_cache.load(key)
    if ctx is not None:
        log("prompt embedding: from cache (T5 not loaded)")
        return ctx
    from lowvram.model.text_encoder import load_text_encoder

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    enc = load_text_encoder(ckpt.root, device=device, dtype=dtype, quant=quant)
    ctx = enc.encode([prompt])[0].float().cpu()
    del enc  # the quantized encoder goes before a bf16 one may load for the cosine
    free_memory()
    if quant != "bf16":
        report_t5_cosine(ckpt, prompt, ctx, device, dtype, quant, log)
    prompt_cache.store(key, ctx, log=log)
    return ctx


def report_t5_cosine(ckpt, prompt, ctx, device, dtype, t5_mode, log=print):
    """Once per T5 file and mode: the cosine of the 8/4-bit embedding against bf16, computed with the bf16
    encoder after the quantized one is freed (the same encode-phase memory as a bf16 run)."""
    from lowvram.model.text_encoder import embedding_cosine, load_text_encoder

    note = f"t5-cosine-{prompt_cache.prompt_key('', ckpt.t5, t5_mode)}.txt"
    if prompt_cache.read_note(note) is not None:
        return
    enc = load_text_encoder(ckpt.root, device=device, dtype=dtype, quant="bf16")
    ref = enc.encode([prompt])[0].float().cpu()
    del enc
    free_memory()
    cos = embedding_cosine([ctx], [ref])
    log(f"umT5 {t5_mode}: embedding cosine against bf16 {cos:.4f} (printed once for this T5 file)")
    prompt_cache.write_note(note, f"{cos:.6f}\n", log=log)


def encode_audio(ckpt, wave, device, num_clip: int | None):
    """wav2vec2 features per clip (lowvram.pipeline.audio_features) and the number of clips to generate."""
    from lowvram.model.audio_encoder import load_audio_encoder
    from lowvram.pipeline.audio_features import ClipAudio

    def encoder(device=device):
        return load_audio_encoder(ckpt.root, device=device,
                                  dtype=torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)

    feats = ClipAudio(encoder, wave, device, video_fps=FPS, clip_frames=CLIP_FRAMES)
    free_memory()  # the whole-file encoder is gone; a windowed one waits on the CPU
    return feats, feats.num_clips if num_clip is None else min(feats.num_clips, num_clip)


class AllClips:
    """Features of every frame already in one tensor [1, L+1, D, N] (benchmarks, tests)."""

    def __init__(self, feats: torch.Tensor):
        self.feats = feats

    def clip(self, r: int) -> torch.Tensor:
        return self.feats[..., r * CLIP_FRAMES:(r + 1) * CLIP_FRAMES]


def clip_source(features):
    """A per-clip feature source (`.clip(r)`) from ClipAudio or a whole-video tensor."""
    return AllClips(features) if isinstance(features, torch.Tensor) else features


def block_audio(features, idx: BlockIndex) -> torch.Tensor:
    """The block's 12 video-rate feature frames [1, L+1, D, 12] (zeros past the audio's end)."""
    n = FRAMES_PER_BLOCK * VIDEO_FRAMES_PER_LATENT
    a = features.clip(idx.clip)[..., idx.block * n:(idx.block + 1) * n]
    if a.shape[-1] < n:
        a = torch.nn.functional.pad(a, (0, n - a.shape[-1]))
    return a


def encode_conditioning(vae, image: torch.Tensor):
    """ref latent [1,16,1,h,w] (the 5x-repeat trick) and the last 19 motion latents [1,16,19,h,w]."""
    from lowvram.model.vae import encode_repeated

    frame = image[None, :, None].to(vae.dtype)                                  # [1, 3, 1, H, W]
    ref = vae.encode(frame.expand(-1, -1, REF_REPEAT, -1, -1))[:, :, 1:2]
    motion = encode_repeated(vae, frame, REF_REPEAT * MOTION_FRAMES)
    return ref, motion[:, :, -MOTION_LATENTS:]


def reencode_motion(vae, image, clip0_video):
    """Motion latents after clip 0 with online decode: the 365-frame window of ref pixels with the
    decoded clip-0 frames [3, T, H, W] rolled in at the end, VAE-encoded; the last 19 latents."""
    n = REF_REPEAT * MOTION_FRAMES
    keep = min(MOTION_FRAMES, clip0_video.shape[1])
    window = torch.cat([image[:, None].expand(-1, n - keep, -1, -1), clip0_video[:, -keep:]], dim=1)
    z = vae.encode(window[None].to(vae.dtype))
    return z[:, :, -MOTION_LATENTS:]


def muxed_audio(wave: np.ndarray, clips: int) -> np.ndarray:
    """The audio track: from the first kept frame on, padded with silence to the video's length (the frames
    past the audio's end were driven by zero features)."""
    wave = wave[DROPPED_FRAMES * AUDIO_RATE // FPS:]
    n_audio = output_frames(clips) * AUDIO_RATE // FPS
    return np.pad(wave, (0, max(0, n_audio - wave.shape[0])))
