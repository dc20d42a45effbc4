import copy

import pytest
import torch
from torch import nn

from lowvram.errors import LowvramError
from lowvram.runtime import offload
from lowvram.runtime.offload import BlockStreamer, alloc_host, retry_on_oom, stream_order


class ToyBlock(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.register_buffer("shift", torch.randn(d))

    def forward(self, x):  # x: [B, L, d]
        return x + self.fc2(torch.relu(self.fc1(self.norm(x)))) + self.shift


class ToyStack(nn.Module):
    """Blocks run in order; an injector after some of them (like the audio injectors)."""

    def __init__(self, n=6, d=37, hidden=53, inject=(2,)):
        super().__init__()
        self.blocks = nn.ModuleList([ToyBlock(d, hidden) for _ in range(n)])
        self.injector = nn.ModuleDict({str(i): nn.Linear(d, d) for i in inject})

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            x = b(x)
            if str(i) in self.injector:
                x = x + self.injector[str(i)](x)
        return x


def _stack(seed=0, **kw):
    torch.manual_seed(seed)
    ref = ToyStack(**kw)
    for p in ref.parameters():  # non-trivial values everywhere (LayerNorm starts at ones/zeros)
        p.data.normal_()
    return ref, copy.deepcopy(ref)


def _inputs(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 11, 37, generator=g) for _ in range(n)]


def _attached(model):
    return {int(k): [m] for k, m in model.injector.items()}


@torch.no_grad()
def test_streamed_equals_resident_cpu():
    ref, model = _stack()
    s = BlockStreamer(model.blocks, resident={1, 4}, device="cpu", n_buffers=2, attached=_attached(model))
    assert s.streamed == [0, 2, 3, 5]
    seen = []  # block 3 computes from a device buffer, not from its host slab
    model.blocks[3].register_forward_hook(lambda m, a, o: seen.append(m.fc1.weight.untyped_storage().data_ptr()))
    xs = _inputs(3)
    for x in xs:
        assert torch.equal(model(x), ref(x))
    # each streamed block is copied once per forward, plus block 0 prefetched for the next forward
    assert s.stats()["loads"] == 4 * len(xs) + 1
    assert s.stats()["bytes_h2d"] == sum(s._slabs[i].numel() for i in s.streamed) * len(xs) + s._slabs[0].numel()
    assert set(seen) <= {b.untyped_storage().data_ptr() for b in s._gpu} and len(seen) == len(xs)
    s.remove()
    # streamed blocks stay as views of their single host slab; the stack still computes the same
    w = model.blocks[3].fc1.weight
    slab = s._slabs[3]
    assert w.untyped_storage().data_ptr() == slab.untyped_storage().data_ptr()
    assert torch.equal(model(xs[0]), ref(xs[0]))


@torch.no_grad()
def test_one_buffer_and_heterogeneous_layouts():
    # block 2 carries its injector (a bigger slab): buffers take the largest size
    ref, model = _stack(seed=3, n=5)
    s = BlockStreamer(model.blocks, resident={0}, device="cpu", n_buffers=1, attached=_attached(model))
    assert len(s._gpu) == 1 and s._gpu[0].numel() == max(t.numel() for t in s._slabs.values())
    assert s._slabs[2].numel() > s._slabs[1].numel()
    for x in _inputs(2, seed=5):
        assert torch.equal(model(x), ref(x))


@torch.no_grad()
def test_out_of_order_call_loads_on_demand():
    ref, model = _stack(seed=4)
    BlockStreamer(model.blocks, resident={0, 5}, device="cpu", n_buffers=2)
    x = _inputs(1, seed=7)[0]
    # run block 3 alone (not the prefetched one) and then the whole stack
    assert torch.equal(model.blocks[3](x), ref.blocks[3](x))
    assert torch.equal(model(x), ref(x))


@torch.no_grad()
def test_demote_one_and_oom_retry():
    ref, model = _stack(seed=5)
    s = BlockStreamer(model.blocks, resident=set(range(6)), device="cpu", n_buffers=2,
                      attached=_attached(model), demote_order=stream_order(6, [2]))
    calls = []

    def forward(x):  # a fake budget: "out of memory" until at least 3 blocks stream
        calls.append(len(s.streamed))
        if len(s.streamed) < 3:
            raise torch.cuda.OutOfMemoryError("fake OOM")
        return model(x)

    logs = []
    x = _inputs(1, seed=9)[0]
    out = retry_on_oom(lambda: forward(x), s, log=logs.append)
    assert torch.equal(out, ref(x))
    assert calls == [0, 1, 2, 3] and len(logs) == 3 and "retrying" in logs[0]
    assert s.streamed == sorted(stream_order(6, [2])[:3]) and 2 not in s.streamed  # light blocks leave first
    while s.resident:
        s.demote_one()
    assert torch.equal(model(x), ref(x))
    with pytest.raises(LowvramError, match="every DiT block already streamed.*3.0 GiB"):
        s.demote_one(measured_peak_bytes=3 * 1024**3)


def test_stream_order_spreads_light_blocks_first():
    order = stream_order(40, [0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39])
    assert sorted(order) == list(range(40))
    assert not set(order[:28]) & {0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39}
    first4 = sorted(order[:4])
    assert min(b - a for a, b in zip(first4, first4[1:])) >= 5  # spread, not adjacent


def test_pinned_fallback_warns_with_cost(monkeypatch):
    real = offload._alloc_host

    def fake(nbytes, pin):
        if pin:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        return real(nbytes, pin)

    monkeypatch.setattr(offload, "_alloc_host", fake)
    with pytest.warns(RuntimeWarning, match="5x slower"):
        buf, pinned = alloc_host(1000, True)
    assert not pinned and buf.numel() == 1000 and not buf.is_pinned()


class _FakeCudart:
    """Records cudaHostRegister/Unregister calls (the CPU build has no driver)."""

    def __init__(self):
        self.registered, self.unregistered = [], []

    def cudaHostRegister(self, ptr, nbytes, flags):
        self.registered.append((ptr, nbytes, flags))
        return 0

    def cudaHostUnregister(self, ptr):
        self.unregistered.append(ptr)
        return 0


def test_pinned_buffers_are_registered_at_their_size_until_the_last_view_dies(monkeypatch):
    import gc

    rt = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: rt)
    monkeypatch.setattr(torch.cuda, "check_error", lambda res: None if res == 0 else pytest.fail(f"error {res}"))
    nbytes = 5 * 1024 * 1024 + 123  # not a power of two: torch's pinned allocator would take 8 MiB
    buf, pinned = alloc_host(nbytes, True)
    assert pinned and buf.numel() == nbytes and bool((buf == 0).all())  # every page touched before registering
    assert rt.registered == [(buf.data_ptr(), nbytes, 0)]
    view = buf[1000:2000].view(torch.int32)  # a slab view outlives the buffer tensor
    del buf
    gc.collect()
    assert rt.unregistered == []
    view.copy_(torch.randint(-9, 9, view.shape, dtype=torch.int32))
    ptr = rt.registered[0][0]
    del view
    gc.collect()
    assert rt.unregistered == [ptr]


def test_failed_registration_falls_back_to_pageable(monkeypatch):
    class Refuses(_FakeCudart):
        def cudaHostRegister(self, ptr, nbytes, flags):
            return 2  # cudaErrorMemoryAllocation

    def check(res):
        if res != 0:
            raise RuntimeError(f"CUDA error {res}")  # what torch.cuda.CudaError is (it needs a driver to build)

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Refuses())
    monkeypatch.setattr(torch.cuda, "check_error", check)
    with pytest.warns(RuntimeWarning, match="5x slower"):
        buf, pinned = alloc_host(4096, True)
    assert not pinned and buf.numel() == 4096


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_registered_buffer_is_pinned_and_copies_asynchronously():
    buf, pinned = alloc_host(3 * 1024 * 1024 + 7, True)
    assert pinned and buf.is_pinned() and buf.numel() == 3 * 1024 * 1024 + 7
    src = torch.randint(0, 255, (buf.numel(),), dtype=torch.uint8)
    buf.copy_(src)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        dev = buf.to("cuda", non_blocking=True)
    s.synchronize()
    assert torch.equal(dev.cpu(), src)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_streamed_equals_resident_cuda():
    ref, model = _stack(seed=6)
    ref = ref.cuda()
    s = BlockStreamer(model.blocks, resident={2}, device="cuda", n_buffers=2, attached=_attached(model))
    model.injector.cuda()
    for x in _inputs(4, seed=11):
        x = x.cuda()
        assert torch.equal(model(x), ref(x))
    st = s.stats()
    assert st["copy_busy_s"] > 0 and st["pinned_bytes"] > 0


@torch.no_grad()
def test_apply_block_streaming_follows_the_plan():
    from lowvram.model.config import DiTConfig
    from lowvram.runtime.offload import apply_block_streaming
    from lowvram.runtime.planner import make_plan
    from lowvram.runtime.profile import Profile

    cfg = DiTConfig(dim=64, ffn_dim=96, freq_dim=32, num_heads=4, num_layers=6, audio_inject_layers=(2,))
    plan = make_plan(Profile.from_name("4090", blocks_resident=3, prefetch_blocks=2), cfg, 64, 48)
    assert len(plan.streamed) == 3 and 2 not in plan.streamed and plan.n_buffers == 3
    ref, model = _stack(seed=8)
    s = apply_block_streaming(model.blocks, plan, device="cpu", attached=_attached(model))
    assert s.streamed == list(plan.streamed) and len(s._gpu) == 3
    for x in _inputs(2, seed=13):
        assert torch.equal(model(x), ref(x))
    s.remove()


@torch.no_grad()
def test_streams_quantized_linear_buffers():
    # W8A8 layers hold plain buffers (int8 qweight, fp32 scale, bf16 bias): one slab packs them all
    from lowvram.quantize.linear import QuantLinear

    ref, model = _stack(seed=10, n=4, inject=())
    for stack in (ref, model):
        for b in stack.blocks:
            b.fc1 = QuantLinear.from_linear(b.fc1.bfloat16(), "int8")
            b.fc2 = QuantLinear.from_linear(b.fc2.bfloat16(), "int8")
            b.norm.bfloat16()
            b.shift = b.shift.bfloat16()
    model.load_state_dict(ref.state_dict())
    s = BlockStreamer(model.blocks, resident={2}, device="cpu", n_buffers=2)
    dtypes = {e.dtype for e in s._layouts[0]}
    assert {torch.int8, torch.float32, torch.bfloat16} <= dtypes
    assert all(e.offset % 256 == 0 for e in s._layouts[0])
    for x in _inputs(2, seed=17):
        x = x.bfloat16()
        assert torch.equal(model(x), ref(x))
