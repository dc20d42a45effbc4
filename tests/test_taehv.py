"""TAEHV decoder for Wan 2.1 latents (lowvram/model/taehv.py) on random weights in the public key layout.

Quality is not tested (no TAEHV weights here); these check the design's structure, streaming, frame
count and range, the loader, and agreement with the design's own whole-video ("parallel") algorithm."""

import pytest
import torch
import torch.nn.functional as F

from lowvram.demo.components import write_tiny_taehv
from lowvram.errors import CheckpointError, LowvramError
from lowvram.model.taehv import MemBlock, TAEHVDecoder, TGrow, TinyStreamingDecoder, find_taehv_weights, load_taehv
from lowvram.runtime.decode import OverlappedDecoder


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py says why


@pytest.fixture(scope="module")
def tae_path(tmp_path_factory):
    return write_tiny_taehv(tmp_path_factory.mktemp("taehv") / "taew2_1.pth", seed=5)


@pytest.fixture(scope="module")
def tae(tae_path):
    return load_taehv(tae_path, dtype=torch.float32)


def lat(n, seed, h=3, w=5):
    return torch.randn(1, 16, n, h, w, generator=torch.Generator().manual_seed(seed))


def public_parallel(tae, z):
    """The design's decode_video(parallel=True), written from its description: every block over all
    frames at once, a MemBlock's memory = its input shifted one frame (zeros first), the first
    t_upscale - 1 frames dropped, output clamped to [0, 1]."""
    x = z.transpose(1, 2)  # NTCHW
    n = x.shape[0]
    x = x.flatten(0, 1)
    for layer in tae.decoder:
        if isinstance(layer, MemBlock):
            x5 = x.unflatten(0, (n, -1))
            mem = F.pad(x5, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1].flatten(0, 1)
            x = layer(x, mem)
        else:
            x = layer(x)
    x = x.unflatten(0, (n, -1)).clamp(0, 1)[:, tae.t_upscale - 1:]
    return x.transpose(1, 2) * 2 - 1


def test_public_key_layout():
    with torch.device("meta"):
        model = TAEHVDecoder()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 2 + 9 * 6 + 3 + 3 + 2  # first conv, 9 MemBlocks, 3 TGrows, 3 bias-free convs, last conv
    assert shapes["decoder.1.weight"] == [256, 16, 3, 3] and shapes["decoder.1.bias"] == [256]
    assert shapes["decoder.3.conv.0.weight"] == [256, 512, 3, 3]
    assert shapes["decoder.5.conv.4.weight"] == [256, 256, 3, 3]
    assert shapes["decoder.7.conv.weight"] == [256, 256, 1, 1]  # TGrow(256, 1): no time upscale
    assert shapes["decoder.8.weight"] == [128, 256, 3, 3] and "decoder.8.bias" not in shapes
    assert shapes["decoder.13.conv.weight"] == [256, 128, 1, 1]  # TGrow(128, 2)
    assert shapes["decoder.17.conv.2.weight"] == [64, 64, 3, 3]
    assert shapes["decoder.19.conv.weight"] == [128, 64, 1, 1]
    assert shapes["decoder.20.weight"] == [64, 64, 3, 3] and "decoder.20.bias" not in shapes
    assert shapes["decoder.22.weight"] == [3, 64, 3, 3] and shapes["decoder.22.bias"] == [3]
    assert not any(".skip." in k for k in shapes)
    assert sum(v.numel() for v in model.parameters()) == 9_844_611
    assert model.t_upscale == 4 and model.space_upscale == 8


def test_memblock_and_tgrow_follow_the_design(tae):
    g = torch.Generator().manual_seed(1)
    block = tae.decoder[15]
    x, past = torch.randn(2, 64, 4, 6, generator=g), torch.randn(2, 64, 4, 6, generator=g)
    c = block.conv
    want = F.relu(c[4](F.relu(c[2](F.relu(c[0](torch.cat([x, past], 1)))))) + x)
    torch.testing.assert_close(block(x, past), want)
    grow = tae.decoder[13]
    assert isinstance(grow, TGrow) and grow.stride == 2
    x = torch.randn(3, 128, 2, 2, generator=g)
    y = grow(x)
    full = F.conv2d(x, grow.conv.weight)  # [3, 256, 2, 2]
    assert y.shape == (6, 128, 2, 2)
    for i in range(3):
        for j in range(2):
            torch.testing.assert_close(y[2 * i + j], full[i, 128 * j:128 * (j + 1)])


def test_streaming_equals_whole_and_the_public_algorithm(tae):
    z = lat(5, seed=2)
    whole = tae.decode(z)
    assert whole.shape == (1, 3, 17, 24, 40) and whole.dtype == torch.float32  # 4n - 3
    assert whole.min() >= -1 and whole.max() <= 1 and whole.std() > 0.02
    assert (whole.abs() == 1).float().mean() < 0.05
    torch.testing.assert_close(whole, public_parallel(tae, z), rtol=1e-5, atol=1e-5)
    dec = TinyStreamingDecoder(tae)
    dec.decode(lat(2, seed=3))  # history that reset must clear
    dec.reset()
    pieces = [dec.decode(z[:, :, :1]), dec.decode(z[:, :, 1:3]), dec.decode(z[:, :, 3:])]
    assert [p.shape[2] for p in pieces] == [1, 8, 8]
    assert torch.equal(torch.cat(pieces, dim=2), whole)
    assert not torch.allclose(pieces[1][:, :, :4], pieces[1][:, :, 4:])  # frames differ in time


def test_streaming_first_piece_shorter_than_the_dropped_frames(tae):
    z = lat(3, seed=4)
    dec = TinyStreamingDecoder(tae, group=3)
    out = dec.decode(z)
    assert out.shape[2] == 9
    torch.testing.assert_close(out, tae.decode(z), rtol=1e-5, atol=1e-5)  # other batch shapes: rounding only
    assert dec.decode(lat(3, seed=5)).shape[2] == 12
    with pytest.raises(LowvramError, match="16, n, h, w"):
        dec.decode(torch.randn(1, 48, 1, 3, 5))
    with pytest.raises(LowvramError, match="group"):
        TinyStreamingDecoder(tae, group=0)


def test_overlapped_tiny_decoder_on_cpu(tae):
    warm, blocks = lat(2, seed=6), [lat(3, seed=7 + i) for i in range(3)]
    plain = TinyStreamingDecoder(tae)
    plain.decode(warm)
    want = [plain.decode(b) for b in blocks]
    dec = TinyStreamingDecoder(tae)
    dec.decode(warm)
    assert len(dec.state_tensors()) == 9
    ov = OverlappedDecoder(dec)
    for b in blocks:
        ov.submit(b)
    got = ov.ready() + ov.drain()
    assert len(got) == 3 and all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loader_round_trip_ignores_the_encoder(tmp_path, suffix):
    path = write_tiny_taehv(tmp_path / f"taew2_1{suffix}", seed=8, dtype=torch.float16)
    sd = torch.load(path, weights_only=True) if suffix == ".pth" else __import__("safetensors.torch").torch.load_file(
        str(path))
    assert any(k.startswith("encoder.") for k in sd) and sd["decoder.1.weight"].dtype == torch.float16
    model = load_taehv(path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k].bfloat16()), k
    no_enc = write_tiny_taehv(tmp_path / f"dec_only{suffix}", seed=8, dtype=torch.float16, with_encoder=False)
    assert torch.equal(load_taehv(no_enc).decoder[22].weight, model.decoder[22].weight)


def test_loader_cuts_a_wider_tgrow_to_its_last_rows(tae_path, tmp_path):
    sd = torch.load(tae_path, weights_only=True)
    wide = torch.randn(512, 256, 1, 1)  # trained with time upscale at the first stage
    torch.save(dict(sd, **{"decoder.7.conv.weight": wide}), tmp_path / "wide.pth")
    assert torch.equal(load_taehv(tmp_path / "wide.pth", dtype=torch.float32).decoder[7].conv.weight, wide[256:])


def test_loader_errors_are_one_line(tae_path, tmp_path):
    sd = torch.load(tae_path, weights_only=True)
    cases = {}
    torch.save(dict(sd, **{"decoder.1.weight": torch.zeros(256, 48, 3, 3)}), tmp_path / "w22.pth")
    cases["w22.pth"] = "48-channel latents"
    torch.save({k: v for k, v in sd.items() if k != "decoder.22.bias"}, tmp_path / "miss.pth")
    cases["miss.pth"] = r"1 missing key\(s\) \(decoder\.22\.bias\)"
    torch.save(dict(sd, **{"decoder.9.conv.0.weight": torch.zeros(128, 128, 3, 3)}), tmp_path / "shape.pth")
    cases["shape.pth"] = r"decoder\.9\.conv\.0\.weight has shape \[128, 128, 3, 3\], expected \[128, 256, 3, 3\]"
    torch.save(dict(sd, **{"decoder.30.weight": torch.zeros(1)}), tmp_path / "extra.pth")
    cases["extra.pth"] = r"unexpected key\(s\) \(decoder\.30\.weight\)"
    torch.save(dict(sd, **{"conv2.weight": torch.zeros(1)}), tmp_path / "wanvae.pth")
    cases["wanvae.pth"] = "not a TAEHV decoder"
    torch.save([1, 2], tmp_path / "list.pth")
    cases["list.pth"] = "not a state dict"
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage" * 10)
    cases["junk.safetensors"] = "cannot read"
    cases["absent.pth"] = "do not exist"
    for name, pattern in cases.items():
        with pytest.raises(CheckpointError, match=pattern) as info:
            load_taehv(tmp_path / name)
        msg = str(info.value)
        assert name in msg and "\n" not in msg and "taew2_1" in msg, msg


def test_find_weights(tmp_path):
    with pytest.raises(CheckpointError, match="--vae-path") as info:
        find_taehv_weights(tmp_path)
    assert "taew2_1.pth" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "taew2_1.pth").write_bytes(b"")
    assert find_taehv_weights(tmp_path) == tmp_path / "taew2_1.pth"
    (tmp_path / "taew2_1.safetensors").write_bytes(b"")
    assert find_taehv_weights(tmp_path) == tmp_path / "taew2_1.safetensors"
    assert find_taehv_weights(tmp_path, tmp_path / "x.pth") == tmp_path / "x.pth"
