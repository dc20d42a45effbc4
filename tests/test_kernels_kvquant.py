"""kernels/kvquant.py: the INT8 step caches' per-(token, head) quantization and dequantization kernels give the bits
of rowquant's torch functions, read from and write into strided views of larger buffers (a slot's token range, the
staging and write-back chunks) without touching anything outside them. CPU: Triton's interpreter; `-m cuda`: the
compiled kernels against the torch functions on the GPU."""

import os

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from lowvram.kernels import kvquant as KQ  # noqa: E402
from lowvram.kernels import rowquant as RQ  # noqa: E402
from lowvram.kernels.configs import INTERPRETER_WHY, interpreter_ready  # noqa: E402

on_cpu = pytest.mark.skipif(not interpreter_ready(), reason=INTERPRETER_WHY)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def slot_and_chunk(device, H=5, D=32, B=2, cap=24, a=7, n=9, seed=None):
    """A [2, B, cap, H, D] bf16 slot of random rows with magnitudes spread over 1e-3..1e3 and some all-zero rows, and
    its token range [a, a + n) (the write-back's chunk)."""
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(1 << 30, ())))
    x = torch.randn(2, B, cap, H, D, generator=g) * 10.0 ** torch.empty(2, B, cap, H, 1).uniform_(-3, 3, generator=g)
    x[0, 0, a + 1, 2] = 0.0
    return x.to(device, torch.bfloat16), slice(a, a + n)


def _quant_case(device, kernel):
    slot, chunk = slot_and_chunk(device)
    x = slot[:, :, chunk]  # strided in tokens, as the cache's
    q_buf = torch.full((2, 2, 12) + x.shape[-2:], 99, dtype=torch.int8, device=device)
    s_buf = torch.full((2, 2, 12, x.shape[-2]), -1.0, device=device)
    n = x.shape[2]
    KQ.quantize_heads_int8(x, q_buf[:, :, :n], s_buf[:, :, :n], kernel=kernel)
    q_ref, s_ref = RQ.quantize_rows_int8(x)
    assert torch.equal(q_buf[:, :, :n], q_ref) and torch.equal(s_buf[:, :, :n], s_ref)
    assert (q_buf[:, :, n:] == 99).all() and (s_buf[:, :, n:] == -1.0).all()  # nothing written past the chunk
    assert (s_ref[0, 0, 1, 2] == RQ.SCALE_FLOOR) and (q_ref[0, 0, 1, 2] == 0).all()  # the zero row


def _dequant_case(device, kernel, dtype):
    slot, chunk = slot_and_chunk(device)
    q, s = RQ.quantize_rows_int8(slot)
    out = torch.full(slot.shape, 7.0, dtype=dtype, device=device)
    KQ.dequantize_heads(q[:, :, chunk], s[:, :, chunk], out[:, :, chunk], kernel=kernel)
    ref = RQ.dequantize_rows(q[:, :, chunk], s[:, :, chunk], out=torch.empty_like(out[:, :, chunk]))
    assert torch.equal(out[:, :, chunk], ref)
    keep = torch.ones(slot.shape[2], dtype=torch.bool)
    keep[chunk] = False
    assert (out[:, :, keep] == 7.0).all()  # the slot's other tokens untouched


@on_cpu
def test_quantize_heads_kernel_bits_cpu():
    _quant_case("cpu", kernel=True)


@on_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_heads_kernel_bits_cpu(dtype):
    _dequant_case("cpu", True, dtype)


@on_cpu
def test_three_dim_input_and_new_outputs():
    # [T, H, D] without given outputs (the INT8 sink's layers are [B, Ls, H, D]; a [T, H, D] view works alike)
    slot, chunk = slot_and_chunk("cpu")
    x = slot[1, 0, chunk]
    q, s = KQ.quantize_heads_int8(x, kernel=True)
    q_ref, s_ref = RQ.quantize_rows_int8(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_refuses_a_layout_it_cannot_read():
    q = torch.randint(-127, 128, (4, 3, 8), dtype=torch.int8).transpose(1, 2)  # [T, D, H]: heads not contiguous rows
    with pytest.raises(ValueError, match="H and D contiguous"):
        KQ.dequantize_heads(q, torch.rand(4, 8), torch.empty(4, 8, 3), kernel=True)
    x = torch.randn(2, 6, 3, 4, 8, dtype=torch.bfloat16).transpose(0, 1)  # leading dims that cannot merge
    with pytest.raises(ValueError, match="cannot merge"):
        KQ.quantize_heads_int8(x, kernel=True)


def test_any_strides_quantize():
    # the token kernel reads and writes any strides: heads not contiguous, a transposed [T, D, H] view
    x = torch.randn(5, 8, 3, dtype=torch.bfloat16).transpose(1, 2)  # [T, H, D] with stride(D) = H
    q, s = KQ.quantize_heads_int8(x, kernel=True)
    q_ref, s_ref = RQ.quantize_rows_int8(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_torch_fallback_writes_into_given_views():
    slot, chunk = slot_and_chunk("cpu")
    x = slot[:, :, chunk]
    q = torch.zeros(x.shape, dtype=torch.int8)
    s = torch.zeros(x.shape[:-1])
    KQ.quantize_heads_int8(x, q, s, kernel=False)
    q_ref, s_ref = RQ.quantize_rows_int8(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert not KQ.kernel_usable(x)  # the CPU runs the torch functions by default


@needs_cuda
@pytest.mark.cuda
def test_kernels_bits_cuda():
    _quant_case("cuda", kernel=True)
    _dequant_case("cuda", True, torch.bfloat16)


def test_refuses_scales_of_another_shape():
    x = torch.randn(6, 3, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="quantize_heads_int8"):
        KQ.quantize_heads_int8(x, scale=torch.empty(6, 4), kernel=True)
    with pytest.raises(ValueError, match="scales must be"):
        KQ.dequantize_heads(x.to(torch.int8), torch.empty(6, 4), torch.empty(6, 3, 8), kernel=True)


def _kv8_case(device, kernel):
    """kv8_write's two quantizations into a KV8Cache (K smoothed by the cache's mean, token-major; V and both scales
    token-contiguous), by quantize_tokens_int8, against rowquant's torch functions on the same inputs."""
    from lowvram.kernels import attention8 as A8

    B, L, H, D, start, n = 2, 80, 3, 32, 11, 37  # n not a multiple of the kernel's 32 tokens
    slot, _ = slot_and_chunk(device, H=H, D=D, B=B, cap=n)
    k, v = slot[0], slot[1]  # [B, n, H, D]
    cache = A8.kv8_alloc(B, L, H, D, device)
    cache.k_mean.copy_(torch.randn(B, H, D))
    sentinel_k, sentinel_v = cache.k.clone(), cache.v.clone()
    win = slice(start, start + n)
    KQ.quantize_tokens_int8(k, cache.k[:, win], cache.k_scale[..., win].transpose(1, 2), mean=cache.k_mean,
                            kernel=kernel)
    KQ.quantize_tokens_int8(v, cache.v[..., win].permute(0, 3, 1, 2), cache.v_scale[..., win].transpose(1, 2),
                            kernel=kernel)
    kq, ks = RQ.quantize_rows_int8(k.float() - cache.k_mean[:, None])
    vq, vs = RQ.quantize_rows_int8(v)
    assert torch.equal(cache.k[:, win], kq) and torch.equal(cache.k_scale[..., win], ks.transpose(1, 2))
    assert torch.equal(cache.v[..., win], vq.permute(0, 2, 3, 1))
    assert torch.equal(cache.v_scale[..., win], vs.transpose(1, 2))
    outside = torch.ones(L, dtype=torch.bool)
    outside[win] = False
    assert torch.equal(cache.k[:, outside], sentinel_k[:, outside])  # the cache's other tokens untouched
    assert torch.equal(cache.v[..., outside], sentinel_v[..., outside])
    assert (cache.k_scale[..., outside] == 1).all() and (cache.v_scale[..., outside] == 1).all()


@on_cpu
def test_quantize_tokens_into_a_kv8_cache_cpu():
    _kv8_case("cpu", kernel=True)


def test_quantize_tokens_refuses_mismatched_outputs():
    x = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="quantize_tokens_int8"):
        KQ.quantize_tokens_int8(x, torch.empty(1, 4, 2, 8, dtype=torch.int8), torch.empty(1, 4, 3), kernel=False)


@needs_cuda
@pytest.mark.cuda
def test_quantize_tokens_cuda():
    _kv8_case("cuda", kernel=True)
