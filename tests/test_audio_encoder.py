"""wav2vec2 audio encoder: hidden-state layout and frame rate, 50 -> 30 -> 25 fps bucketing, loader errors."""

import json

import numpy as np
import pytest
import torch

from lowvram.constants import WAV2VEC_DIR
from lowvram.demo.components import write_tiny_wav2vec2
from lowvram.errors import CheckpointError, LowvramError
from lowvram.model.audio_encoder import bucket_audio_features, load_audio_encoder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("w2v")
    write_tiny_wav2vec2(d, seed=2)
    return d


@pytest.fixture(scope="module")
def enc(tiny):
    return load_audio_encoder(tiny)


def _wave(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32) * 0.3


def _conv_frames(samples: int) -> int:
    n = samples
    for k, s in zip([10, 3, 3, 3, 3, 2, 2], [5, 2, 2, 2, 2, 2, 2]):
        n = (n - k) // s + 1
    return n


def test_hidden_state_count_and_frame_rate(enc):
    h = enc.hidden_states(_wave(16000, 0))
    assert h.shape == (3, 49, 32)  # 1 s -> 49 frames, embedding + 2 layers
    assert enc.num_hidden_states == 3
    h = enc.hidden_states(_wave(12345, 1))
    assert h.shape == (3, _conv_frames(12345), 32) and h.shape[1] == 38
    assert torch.isfinite(h).all()


def test_hidden_states_are_layer_inputs_then_final_norm(enc):
    """Layout of transformers <= 4.51 (LiveAvatar's): input of each layer, then LayerNorm(last output)."""
    seen = []
    layers = enc.model.encoder.layers
    hooks = [lay.register_forward_pre_hook(lambda m, args, kw: seen.append(args[0] if args else kw["hidden_states"]),
                                           with_kwargs=True) for lay in layers]
    hooks.append(enc.model.encoder.layer_norm.register_forward_hook(lambda m, i, o: seen.append(o)))
    try:
        h = enc.hidden_states(_wave(7000, 2))
    finally:
        for hk in hooks:
            hk.remove()
    assert len(seen) == 3
    for k in range(3):
        torch.testing.assert_close(h[k], seen[k][0])
    assert (h[1] - h[2]).abs().max() > 1e-3


def test_feature_normalisation_makes_gain_irrelevant(enc):
    w = _wave(9000, 3)
    a, b = enc.hidden_states(w), enc.hidden_states(2.5 * w + 0.1)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _interp_align_corners(h: torch.Tensor, n_out: int) -> torch.Tensor:
    # h: [L, T, D] -> [L, n_out, D], linear with both end points kept
    t = h.shape[1]
    out = []
    for j in range(n_out):
        p = j * (t - 1) / (n_out - 1) if n_out > 1 else 0.0
        lo = min(int(np.floor(p)), t - 1)
        hi = min(lo + 1, t - 1)
        w = p - lo
        out.append((1 - w) * h[:, lo] + w * h[:, hi])
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("t50,t30,clips", [(97, 58, 2), (205, 122, 3), (263, 157, 3), (96, 57, 1)])
def test_bucketing_against_independent_indices(t50, t30, clips):
    g = torch.Generator().manual_seed(t50)
    h = torch.randn(3, t50, 5, generator=g, dtype=torch.float64) + 0.5  # float64: exact positions
    emb, nr = bucket_audio_features(h)
    assert nr == clips == int(t30 / (48 * 1.2)) + 1
    assert emb.shape == (1, 3, 5, 48 * clips)
    feat30 = _interp_align_corners(h, t30)  # int(t50 / 50 * 30) in floats: 205 -> 122, not 123
    for i in range(48 * clips):
        j = (12 * i + 5) // 10  # round(i * 30 / 25); i * 1.2 is never a tie
        if j < t30:
            torch.testing.assert_close(emb[0, :, :, i], feat30[:, j].float())
        else:
            assert torch.count_nonzero(emb[0, :, :, i]) == 0, i
    last_valid = max(i for i in range(48 * clips) if (12 * i + 5) // 10 < t30)
    assert torch.count_nonzero(emb[0, :, :, last_valid]) > 0
    assert torch.count_nonzero(emb[0, :, :, last_valid + 1:]) == 0


def test_bucketing_other_fps_and_clip_length():
    h = torch.randn(2, 140, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    emb, nr = bucket_audio_features(h, video_fps=16, clip_frames=33)
    t30 = 84
    assert nr == int(t30 / (33 * 30 / 16)) + 1 == 2
    feat30 = _interp_align_corners(h, t30)
    for i in range(66):
        j = int(np.round(i / 16 * 30))
        want = feat30[:, j].float() if j < t30 else torch.zeros(2, 3)
        torch.testing.assert_close(emb[0, :, :, i], want)


def test_bucketing_end_to_end_from_wave(enc):
    h = enc.hidden_states(_wave(40000, 4))  # 2.5 s -> 124 frames -> 74 at 30 fps -> 2 clips
    emb, nr = bucket_audio_features(h)
    assert h.shape[1] == 124 and nr == 2 and emb.shape == (1, 3, 32, 96)
    assert emb.dtype == torch.float32


def test_short_and_bad_audio(enc):
    with pytest.raises(LowvramError, match="mono"):
        enc.hidden_states(np.zeros((2, 16000), np.float32))
    with pytest.raises(LowvramError, match="at least 400"):
        enc.hidden_states(_wave(399, 5))
    with pytest.raises(LowvramError, match="too short"):
        bucket_audio_features(torch.randn(3, 1, 4))


def test_loader_errors(tiny, tmp_path):
    with pytest.raises(CheckpointError, match=WAV2VEC_DIR):
        load_audio_encoder(tmp_path)

    def copy(name, drop=(), edit=None):
        d = tmp_path / name / WAV2VEC_DIR
        d.mkdir(parents=True)
        for f in (tiny / WAV2VEC_DIR).iterdir():
            if f.name not in drop:
                (d / f.name).write_bytes(f.read_bytes())
        if edit:
            p = d / "preprocessor_config.json"
            p.write_text(json.dumps({**json.loads(p.read_text()), **edit}))
        return tmp_path / name

    with pytest.raises(CheckpointError, match="preprocessor_config.json is missing"):
        load_audio_encoder(copy("nopre", drop=("preprocessor_config.json",)))
    with pytest.raises(CheckpointError, match="no loadable wav2vec2 weights"):
        load_audio_encoder(copy("noweights", drop=("model.safetensors",)))
    with pytest.raises(CheckpointError, match="sampling_rate 8000"):
        load_audio_encoder(copy("rate", edit={"sampling_rate": 8000}))
