"""Per-clip audio features: the whole-file path (the reference's) and the windowed path for long audio."""

import pytest
import torch

from lowvram.demo.inputs import synth_voice
from lowvram.io.media import load_audio
from lowvram.model.audio_encoder import load_audio_encoder
from lowvram.pipeline.audio_features import ClipAudio, frames_of


@pytest.fixture(scope="module")
def voice(tmp_path_factory):
    p = tmp_path_factory.mktemp("a") / "v.wav"
    synth_voice(str(p), seconds=9.0, seed=3)
    return load_audio(str(p))


def test_frame_count_formula_matches_wav2vec2(tiny_ckpt, voice):
    enc = load_audio_encoder(tiny_ckpt[0])
    for n in (400, 719, 720, 16000, 33333):
        assert enc.hidden_states(voice[:n]).shape[1] == frames_of(n)


def test_windowed_features_follow_the_whole_file_features(tiny_ckpt, voice):
    def encoder(device="cpu"):
        return load_audio_encoder(tiny_ckpt[0], device=device)

    whole = ClipAudio(encoder, voice, "cpu")
    win = ClipAudio(encoder, voice, "cpu", whole_file_seconds=1.0, window_seconds=2.0, context_seconds=1.0)
    assert not whole.windowed and win.windowed
    assert win.num_clips == whole.num_clips == 5
    for r in range(win.num_clips):
        a, b = whole.clip(r), win.clip(r)
        assert a.shape == b.shape == (1, 3, 32, 48)
        assert win._window[1].shape[-1] == win.clips_per_window * 48   # only the current window is kept
        both = (a.abs().sum((1, 2)) > 0) & (b.abs().sum((1, 2)) > 0)
        assert torch.equal(both, a.abs().sum((1, 2)) > 0)                # the same frames are past the end
        if both.any():
            cos = torch.nn.functional.cosine_similarity(a[..., both[0]].flatten(), b[..., both[0]].flatten(), dim=0)
            assert cos > 0.98, (r, float(cos))
