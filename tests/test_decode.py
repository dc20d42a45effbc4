"""lowvram/runtime/decode.py: the overlapped decoder hands back a plain StreamingDecoder's frames, in order;
the graphed decoder replays the eager steps' bits (GPU)."""

import pytest
import torch

from lowvram.demo.components import write_tiny_vae
from lowvram.io.video_writer import to_uint8
from lowvram.model.vae import DecodeOptions, StreamingDecoder, load_vae
from lowvram.runtime.decode import GraphedDecoder, OverlappedDecoder

cuda = pytest.mark.cuda


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py says why


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
    return write_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny_vae.pth", seed=13)


def latents(n_blocks, seed, device="cpu", h=3, w=5):
    g = torch.Generator().manual_seed(seed)
    warm = torch.randn(1, 16, 4, h, w, generator=g).to(device)
    return warm, [torch.randn(1, 16, 3, h, w, generator=g).to(device) for _ in range(n_blocks)]


def plain_frames(vae, warm, blocks, opts=DecodeOptions()):
    dec = StreamingDecoder(vae, opts)
    dec.decode(warm)
    return [dec.decode(b) for b in blocks]


def run_overlapped(decoder, warm, blocks, **kw):
    decoder.decode(warm)  # warmed on the caller's stream, as the engine does with the motion latents
    ov = OverlappedDecoder(decoder, **kw)
    got = []
    for b in blocks:
        ov.submit(b)
        got += ov.ready()
    assert len(got) + ov.pending == len(blocks)
    got += ov.drain()
    assert ov.pending == 0 and ov.ready() == [] and ov.drain() == []
    return got


def test_overlapped_gives_the_plain_frames_in_order(vae_path):
    vae = load_vae(vae_path, dtype=torch.float32)
    warm, blocks = latents(4, seed=1)
    want = plain_frames(vae, warm, blocks)
    got = run_overlapped(StreamingDecoder(vae), warm, blocks)
    assert len(got) == 4
    for g, w in zip(got, want):
        assert g.shape == (1, 3, 12, 24, 40) and torch.equal(g, w)
    assert not torch.equal(got[0], got[1])


def test_overlapped_uint8_is_the_writers_conversion(vae_path):
    vae = load_vae(vae_path, dtype=torch.bfloat16)
    warm, blocks = latents(2, seed=2)
    want = [to_uint8(f) for f in plain_frames(vae, warm, blocks)]
    got = run_overlapped(StreamingDecoder(vae), warm, blocks, to_uint8=True, max_pending=1)
    for g, w in zip(got, want):
        assert g.dtype == torch.uint8 and g.shape == (12, 24, 40, 3) and torch.equal(g, w)


def test_graphed_decoder_on_cpu_is_the_eager_decoder(vae_path):
    vae = load_vae(vae_path, dtype=torch.float32)
    warm, blocks = latents(2, seed=3)
    opts = DecodeOptions(group=3)
    dec = GraphedDecoder(vae, opts)
    dec.decode(warm)
    got = [dec.decode(b) for b in blocks]
    assert dec.graphs == {}  # no graphs off CUDA
    for g, w in zip(got, plain_frames(vae, warm, blocks, opts)):
        assert torch.equal(g, w)
    with pytest.raises(ValueError, match="max_pending"):
        OverlappedDecoder(dec, max_pending=0)


@cuda
@pytest.mark.parametrize("opts", [DecodeOptions(), DecodeOptions(group=3), DecodeOptions.fast(group=3)])
def test_graphed_replays_the_eager_bits_on_gpu(vae_path, opts):
    vae = load_vae(vae_path, device="cuda", dtype=torch.bfloat16)
    warm, blocks = latents(4, seed=4, device="cuda", h=6, w=10)
    want = plain_frames(vae, warm, blocks, opts)
    dec = GraphedDecoder(vae, opts)
    dec.decode(warm)
    got = [dec.decode(b) for b in blocks]
    assert dec.graphs, "no step was captured"
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    dec.reset()
    assert dec.graphs == {}
    assert torch.equal(dec.decode(warm), StreamingDecoder(vae, opts).decode(warm))


@cuda
@pytest.mark.parametrize("graphed", [False, True])
def test_overlapped_on_gpu_while_the_caller_keeps_working(vae_path, graphed):
    vae = load_vae(vae_path, device="cuda", dtype=torch.bfloat16)
    warm, blocks = latents(4, seed=5, device="cuda", h=6, w=10)
    want = plain_frames(vae, warm, blocks)
    dec = (GraphedDecoder if graphed else StreamingDecoder)(vae)
    dec.decode(warm)
    ov = OverlappedDecoder(dec)
    got, a = [], torch.randn(2048, 2048, device="cuda")
    for b in blocks:
        lat = b * 1.0  # written on the caller's stream just before the submit, then dropped
        ov.submit(lat)
        del lat
        for _ in range(4):  # the "DiT" keeps the caller's stream busy and reuses freed memory
            a = (a @ a).tanh_()
        got += ov.ready()
    got += ov.drain()
    assert all(g.device.type == "cpu" and g.is_pinned() for g in got)
    for g, w in zip(got, want):
        assert torch.equal(g, w.cpu())
