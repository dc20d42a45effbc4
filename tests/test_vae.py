"""Wan2.1 VAE: real-size structure on meta, tiny-size behaviour on CPU in fp32."""

import pytest
import torch
import torch.nn.functional as F

from lowvram.demo.components import write_tiny_vae
from lowvram.errors import CheckpointError, LowvramError
from lowvram.model.vae import DecodeOptions, StreamingDecoder, VAEConfig, WanVAE, encode_repeated, load_vae
from lowvram.model.vae_blocks import TimeCache

# the Wan2.1 latent statistics (docs/model.md §7)
MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
       3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py says why


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny_vae.pth", seed=3)


@pytest.fixture(scope="module")
def vae(tiny_path):
    return load_vae(tiny_path, dtype=torch.float32)


def rand(*shape, seed=0, lo=-1.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * (hi - lo) + lo


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_real_config_matches_wan21_checkpoint_layout():
    with torch.device("meta"):
        model = WanVAE(VAEConfig())
    assert count(model) == 126_892_531
    assert count(model.encoder) == 53_595_872
    assert count(model.decoder) == 73_295_331
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 194
    assert shapes["encoder.conv1.weight"] == [96, 3, 3, 3, 3]
    assert shapes["encoder.downsamples.0.residual.0.gamma"] == [96, 1, 1, 1]
    assert shapes["encoder.downsamples.3.shortcut.weight"] == [192, 96, 1, 1, 1]
    assert shapes["encoder.downsamples.2.resample.1.weight"] == [96, 96, 3, 3]
    assert "encoder.downsamples.2.time_conv.weight" not in shapes  # spatial-only downsample
    assert shapes["encoder.downsamples.5.time_conv.weight"] == [192, 192, 3, 1, 1]
    assert shapes["encoder.middle.1.to_qkv.weight"] == [1152, 384, 1, 1]
    assert shapes["encoder.middle.1.norm.gamma"] == [384, 1, 1]
    assert shapes["encoder.head.2.weight"] == [32, 384, 3, 3, 3]
    assert shapes["conv1.weight"] == [32, 32, 1, 1, 1]
    assert shapes["conv2.weight"] == [16, 16, 1, 1, 1]
    assert shapes["decoder.conv1.weight"] == [384, 16, 3, 3, 3]
    assert shapes["decoder.upsamples.3.time_conv.weight"] == [768, 384, 3, 1, 1]
    assert shapes["decoder.upsamples.3.resample.1.weight"] == [192, 384, 3, 3]
    assert shapes["decoder.upsamples.4.shortcut.weight"] == [384, 192, 1, 1, 1]
    assert shapes["decoder.upsamples.11.resample.1.weight"] == [96, 192, 3, 3]
    assert "decoder.upsamples.11.time_conv.weight" not in shapes
    assert shapes["decoder.upsamples.14.residual.6.weight"] == [96, 96, 3, 3, 3]
    assert shapes["decoder.head.2.weight"] == [3, 96, 3, 3, 3]
    assert not any("dropout" in k or k.endswith("residual.5.weight") for k in shapes)


def test_tiny_checkpoint_round_trip(tiny_path):
    sd = torch.load(tiny_path, weights_only=True)
    assert all(v.dtype == torch.float32 for v in sd.values())
    model = load_vae(tiny_path, dtype=torch.float32)
    assert model.cfg == VAEConfig(dim=8, z_dim=16)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    bf = load_vae(tiny_path)  # default dtype: bf16 as in LiveAvatar
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in bf.parameters()) and not bf.training
    other = torch.load(write_tiny_vae(tiny_path.parent / "other.pth", seed=4, dim=4), weights_only=True)
    assert other["encoder.conv1.weight"].shape[0] == 4
    assert not torch.equal(other["conv2.weight"], sd["conv2.weight"])


def test_encode_shape_normalisation_and_causality(vae):
    video = rand(2, 3, 9, 32, 48, seed=1)
    z = vae.encode(video)
    assert z.shape == (2, 16, 3, 4, 6) and z.dtype == torch.float32
    # z = (mu - mean) / std with mu the first half of conv1(encoder output)
    enc = torch.cat(list(vae.encode_chunks(video, TimeCache())), dim=2)
    mu = F.conv3d(enc, vae.conv1.weight, vae.conv1.bias)[:, :16]
    want = (mu - torch.tensor(MEAN).view(1, -1, 1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-5)
    # causal in time, independent across the batch
    assert torch.equal(vae.encode(video[:, :, :5]), z[:, :, :2])
    torch.testing.assert_close(vae.encode(video[1:]), z[1:], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(z[:, :, 1], z[:, :, 2])


def test_decode_shape_range_and_not_saturated(vae):
    z = torch.randn(2, 16, 3, 3, 5, generator=torch.Generator().manual_seed(2))
    x = vae.decode(z)
    assert x.shape == (2, 3, 9, 24, 40) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert (x.abs() == 1).float().mean() < 0.05 and x.std() > 0.05
    torch.testing.assert_close(vae.decode(z[:1]), x[:1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pieces", [[1, 6], [3, 4], [2, 2, 3], [1] * 7, [5, 1, 1]])
def test_streaming_decode_equals_whole_decode(vae, pieces):
    z = torch.randn(1, 16, 7, 3, 5, generator=torch.Generator().manual_seed(5))
    whole = vae.decode(z)
    dec = StreamingDecoder(vae)
    dec.decode(torch.randn(1, 16, 2, 3, 5))  # leftover history that reset must clear
    dec.reset()
    out, start = [], 0
    for i, n in enumerate(pieces):
        frames = dec.decode(z[:, :, start:start + n])
        assert frames.shape[2] == (1 + 4 * (n - 1) if i == 0 else 4 * n)
        out.append(frames)
        start += n
    assert torch.equal(torch.cat(out, dim=2), whole)


def test_streaming_cache_keeps_two_slices_per_conv(vae):
    dec = StreamingDecoder(vae)
    dec.decode(torch.randn(1, 16, 3, 3, 5, generator=torch.Generator().manual_seed(6)))
    tensors = [s for s in dec.cache.slots if isinstance(s, torch.Tensor)]
    assert tensors and all(s.shape[2] <= 2 for s in tensors)
    # one slot per causal conv on the main path (1x1x1 shortcuts keep no history)
    n_convs = sum(type(m).__name__ == "CausalConv3d" and not name.endswith("shortcut")
                  for name, m in vae.decoder.named_modules())
    assert len(dec.cache.slots) == n_convs


def test_encode_repeated_equals_full_encode_and_stops_early(vae):
    frame = rand(1, 3, 1, 16, 24, seed=7)
    calls = []
    hook = vae.encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        fast = encode_repeated(vae, frame, 161)
    finally:
        hook.remove()
    full = vae.encode(frame.repeat(1, 1, 161, 1, 1))
    assert fast.shape == (1, 16, 41, 2, 3)
    assert torch.equal(fast, full)
    assert len(calls) < 41  # reached the steady state before the end
    short = encode_repeated(vae, frame, 9)
    assert torch.equal(short, vae.encode(frame.repeat(1, 1, 9, 1, 1)))


def test_bad_inputs_raise_lowvram_error(vae):
    with pytest.raises(LowvramError, match="T = 1 \\+ 4k"):
        vae.encode(rand(1, 3, 6, 16, 24))
    with pytest.raises(LowvramError, match="multiples of 8"):
        vae.encode(rand(1, 3, 5, 12, 24))
    with pytest.raises(LowvramError, match="latents"):
        vae.decode(torch.randn(1, 8, 2, 3, 5))
    with pytest.raises(LowvramError, match="n_frames"):
        encode_repeated(vae, rand(1, 3, 1, 16, 24), 10)


def test_load_errors_name_the_file(tiny_path, tmp_path):
    sd = torch.load(tiny_path, weights_only=True)
    cases = {}
    with pytest.raises(CheckpointError, match="does not exist"):
        load_vae(tmp_path / "nope.pth")
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    cases["list.pth"] = "not a state dict"
    torch.save(torch.ones(3), tmp_path / "tensor.pth")
    cases["tensor.pth"] = "not a state dict"
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage" * 10)
    cases["junk.pth"] = "cannot read"
    bad = dict(sd, **{"decoder.head.2.weight": torch.zeros(3, 8, 3, 3, 1)})
    torch.save(bad, tmp_path / "shape.pth")
    cases["shape.pth"] = r"decoder\.head\.2\.weight has shape \[3, 8, 3, 3, 1\], expected \[3, 8, 3, 3, 3\]"
    torch.save({k: v for k, v in sd.items() if k != "decoder.middle.1.proj.bias"}, tmp_path / "miss.pth")
    cases["miss.pth"] = r"1 missing key\(s\) \(decoder\.middle\.1\.proj\.bias\)"
    torch.save(dict(sd, extra=torch.ones(1)), tmp_path / "extra.pth")
    cases["extra.pth"] = r"unexpected key\(s\) \(extra\)"
    torch.save({"weight": torch.ones(2)}, tmp_path / "other.pth")
    cases["other.pth"] = "not a Wan2.1 VAE"
    for name, pattern in cases.items():
        with pytest.raises(CheckpointError, match=pattern) as info:
            load_vae(tmp_path / name)
        msg = str(info.value)
        assert name in msg and "\n" not in msg, msg


def test_bf16_weights_track_fp32(tiny_path, vae):
    bf = load_vae(tiny_path, dtype=torch.bfloat16)
    z = torch.randn(1, 16, 2, 3, 5, generator=torch.Generator().manual_seed(8))
    a, b = vae.decode(z), bf.decode(z)
    assert b.dtype == torch.float32
    assert (a - b).abs().mean() < 0.02
    video = rand(1, 3, 5, 16, 24, seed=9)
    za, zb = vae.encode(video), bf.encode(video)
    assert (za - zb).abs().mean() < 0.05 * za.abs().mean() + 0.02


def test_bf16_upsample_gives_fp32_upsample_bits():
    x = torch.randn(3, 5, 7, 9, generator=torch.Generator().manual_seed(10)).bfloat16()
    direct = F.interpolate(x, scale_factor=(2.0, 2.0), mode="nearest-exact")
    via_fp32 = F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").bfloat16()
    assert torch.equal(direct, via_fp32)


@pytest.mark.parametrize("band", [1 << 23, 50])  # one band per frame / a few rows per band
def test_framewise_norm_silu_matches_whole_tensor_norm(band, monkeypatch):
    from lowvram.model import vae_blocks
    from lowvram.model.vae_blocks import RMS_norm
    monkeypatch.setattr(vae_blocks, "BAND_ELEMENTS", band)
    g = torch.Generator().manual_seed(11)
    norm = RMS_norm(6, images=False).requires_grad_(False)
    norm.gamma.data = 1 + 0.1 * torch.randn(6, 1, 1, 1, generator=g)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 8e-3)):
        x = (3 * torch.randn(2, 6, 5, 7, 9, generator=g)).to(dtype)
        out = torch.full_like(x, float("nan"))
        norm.silu_into(x, out)
        # same formula; on CPU the scalar tail of a vector loop may round 1 ulp apart
        torch.testing.assert_close(out, F.silu(norm(x)).to(dtype), rtol=tol, atol=tol)


# ---------------------------------------------------------------- faster decode options (bounded, not bit-equal)

FAST = {
    "channels_last": DecodeOptions(channels_last=True),
    "fused_norm_twin": DecodeOptions(fused_norm=True, norm_backend="torch"),
    "split_time": DecodeOptions(split_time=True),
    "group3": DecodeOptions(group=3),
    "subpixel": DecodeOptions(subpixel=True),
    "cl+subpixel": DecodeOptions(channels_last=True, subpixel=True),
    "cl+out_align": DecodeOptions(channels_last=True, out_align=24),  # bf16: the tiny VAE's 8/16-wide convs padded
    "all_kernel": DecodeOptions(channels_last=True, fused_norm=True, norm_backend="triton", split_time=True, group=3),
}


@pytest.mark.parametrize("name", list(FAST))
def test_fast_options_track_the_exact_path(tiny_path, vae, name):
    """fp32: within fp32 rounding of the exact path; bf16: no further from fp32 than the exact bf16 path."""
    from lowvram.kernels.configs import interpreter_ready

    opts = FAST[name]
    if opts.norm_backend == "triton" and not interpreter_ready():
        pytest.skip("the Triton norm on the CPU needs TRITON_INTERPRET=1 before triton is imported")
    z = torch.randn(1, 16, 3, 3, 5, generator=torch.Generator().manual_seed(20))
    exact = StreamingDecoder(vae).decode(z)
    fast = StreamingDecoder(vae, opts).decode(z)
    assert fast.shape == exact.shape == (1, 3, 9, 24, 40) and fast.is_contiguous()
    assert (fast - exact).abs().max() < 1e-5
    bf = load_vae(tiny_path, dtype=torch.bfloat16)
    err_exact = (StreamingDecoder(bf).decode(z) - exact).abs()
    err_fast = (StreamingDecoder(bf, opts).decode(z) - exact).abs()
    assert err_fast.mean() <= 1.5 * err_exact.mean() + 1e-4 and err_fast.max() <= 2 * err_exact.max() + 1e-3
    # the default decoder afterwards is the exact one again (the switches are per decoder, set at each call)
    assert torch.equal(StreamingDecoder(vae).decode(z), exact)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_subpixel_conv_is_upsample_then_conv(fmt):
    """fp64: the one conv on the low-resolution image + pixel shuffle equals nearest 2x + the 3x3 conv (odd sizes,
    every border); the weights rebuilt when the conv's weights change."""
    from lowvram.model.vae_blocks import Resample

    g = torch.Generator().manual_seed(24)
    r = Resample(6, "upsample2d").double().requires_grad_(False)  # the decoder runs without autograd
    with torch.no_grad():
        r.resample[1].weight.copy_(torch.randn(r.resample[1].weight.shape, generator=g, dtype=torch.float64))
        r.resample[1].bias.copy_(torch.randn(3, generator=g, dtype=torch.float64))
    r.resample[1].weight.data = r.resample[1].weight.data.contiguous(memory_format=fmt)
    x = torch.randn(2, 6, 2, 5, 7, generator=g, dtype=torch.float64)
    want = r(x)
    r.subpixel = True
    got = r(x)
    assert got.shape == want.shape == (2, 3, 2, 10, 14)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        r.resample[1].weight.mul_(-2)
    torch.testing.assert_close(r(x), -2 * want + 3 * r.resample[1].bias.view(1, 3, 1, 1, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last_3d])
def test_out_align_computes_the_same_channels(fmt):
    """bf16 (the path out_align takes): the padded conv's first channels are the conv's, as a view; refreshed when
    the weights change."""
    from lowvram.model.vae_blocks import CausalConv3d

    g = torch.Generator().manual_seed(25)
    conv = CausalConv3d(8, 12, 3, padding=1).to(torch.bfloat16).requires_grad_(False)
    conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    conv.weight.data = conv.weight.data.contiguous(memory_format=fmt)
    conv.memory_format = fmt
    x = torch.randn(1, 8, 6, 7, 9, generator=g).to(torch.bfloat16).contiguous(memory_format=fmt)
    want = conv.conv_padded(x)
    conv.out_align = 16
    got = conv.conv_padded(x)
    assert got.shape == want.shape == (1, 12, 4, 5, 7)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    conv.weight.mul_(-1)
    torch.testing.assert_close(conv.conv_padded(x).float(), (2 * conv.bias.view(1, -1, 1, 1, 1) - want).float(),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("graphs", [False, True])
def test_padded_history_same_bits(vae, monkeypatch, graphs):
    """Channels-last: the history kept padded (block copies) gives the frames of the unpadded history bit for bit,
    in the static cache of the graphed decoder too (whose slots it sizes)."""
    from lowvram.model import vae_blocks
    from lowvram.runtime.decode import GraphedDecoder

    cls = GraphedDecoder if graphs else StreamingDecoder
    z = torch.randn(1, 16, 6, 3, 5, generator=torch.Generator().manual_seed(26))
    opts = DecodeOptions(channels_last=True)
    dec = cls(vae, opts)
    padded = torch.cat([dec.decode(z[:, :, :1]), dec.decode(z[:, :, 1:3]), dec.decode(z[:, :, 3:])], dim=2)
    padded_slot = lambda d: any(s.shape[-2:] == (5, 7) for s in d.state_tensors())  # noqa: E731 - 3x5 + borders
    assert padded_slot(dec)
    monkeypatch.setattr(vae_blocks, "PADDED_HISTORY", False)
    dec = cls(vae, opts)
    plain = torch.cat([dec.decode(z[:, :, :1]), dec.decode(z[:, :, 1:3]), dec.decode(z[:, :, 3:])], dim=2)
    assert not padded_slot(dec)
    assert torch.equal(padded, plain)


def test_group_decode_steps_and_pieces(vae):
    z = torch.randn(1, 16, 7, 3, 5, generator=torch.Generator().manual_seed(21))
    opts = DecodeOptions(group=3)
    calls = []
    hook = vae.decoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[2]))
    try:
        whole = StreamingDecoder(vae, opts).decode(z)
    finally:
        hook.remove()
    assert calls == [1, 3, 3]  # the first latent alone, then steps of 3
    dec = StreamingDecoder(vae, opts)
    same_steps = torch.cat([dec.decode(z[:, :, :1]), dec.decode(z[:, :, 1:4]), dec.decode(z[:, :, 4:])], dim=2)
    assert torch.equal(same_steps, whole)
    dec = StreamingDecoder(vae, opts)
    other_steps = torch.cat([dec.decode(z[:, :, :2]), dec.decode(z[:, :, 2:])], dim=2)  # steps 1,1 | 3,2
    torch.testing.assert_close(other_steps, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole, vae.decode(z), rtol=1e-5, atol=1e-5)


def test_configure_decoder_touches_only_the_decoder(tiny_path):
    from lowvram.model.vae import configure_decoder

    model = load_vae(tiny_path, dtype=torch.float32)
    video = rand(1, 3, 5, 16, 24, seed=22)
    before = model.encode(video)
    configure_decoder(model, DecodeOptions.fast())
    w = model.decoder.upsamples[0].residual[2].weight
    assert w.is_contiguous(memory_format=torch.channels_last_3d) and not w.is_contiguous()
    assert model.decoder.upsamples[3].resample[1].weight.is_contiguous(memory_format=torch.channels_last)
    assert model.encoder.conv1.weight.is_contiguous()
    assert all(m.fused == "auto" for m in model.decoder.modules() if hasattr(m, "fused"))
    ups = [m for m in model.decoder.modules() if hasattr(m, "subpixel")]
    assert ups and all(m.subpixel for m in ups)
    assert torch.equal(model.encode(video), before)
    configure_decoder(model, DecodeOptions())
    assert not any(m.subpixel for m in ups)
    assert w.is_contiguous() and model.decoder.upsamples[3].resample[1].weight.is_contiguous()
    with pytest.raises(LowvramError, match="group"):
        DecodeOptions(group=0)
    with pytest.raises(LowvramError, match="norm_backend"):
        DecodeOptions(norm_backend="cuda")


def test_static_cache_keeps_slot_tensors_and_bits(vae):
    z = torch.randn(1, 16, 6, 3, 5, generator=torch.Generator().manual_seed(23))
    want = StreamingDecoder(vae).decode(z)
    dec = StreamingDecoder(vae)
    dec.cache = TimeCache(static=True)
    got = [dec.decode(z[:, :, :3])]
    ptrs = [s.data_ptr() for s in dec.cache.slots]
    got += [dec.decode(z[:, :, 3:4]), dec.decode(z[:, :, 4:])]
    assert [s.data_ptr() for s in dec.cache.slots] == ptrs  # copied in place, not replaced
    assert torch.equal(torch.cat(got, dim=2), want)
