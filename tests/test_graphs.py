"""CUDA graphs of the steady DiT call (runtime/graphs.py) give the eager call's bits, capture once per steady
segment, and stay out of calls they cannot replay.

On the CPU the graph is RecordedGraph: it records the capture's ATen calls and replays them with the tensors made
outside the capture (weights, caches, the static inputs) read as they are then, and every Python decision (ints,
slices, shapes) the capture's, as a CUDA graph replays. A value of the host's that changed between calls and was
not copied into a static tensor therefore shows as a wrong frame here: `test_recorded_graph_bakes_host_values`
shows the stand-in does bake them, and `test_positions_left_stale_change_the_frames` that the engine test notices
a graph that writes the ring where the capture did. The `cuda` tests run torch.cuda.CUDAGraph itself."""

import pytest
import torch

from lowvram.errors import LowvramError
from lowvram.io.weights import load_dit
from lowvram.model.config import DiTConfig
from lowvram.runtime import graphs as graphs_mod
from lowvram.runtime.engine import Engine
from lowvram.runtime.graphs import ForwardGraphs, RecordedGraph
from lowvram.runtime.planner import make_plan
from lowvram.runtime.profile import Profile, parse_set
from lowvram.runtime.schedule import block_of, ticks

HW = (16, 16)
BLOCKS = 12  # a drain at block 4 (as the bench and the sink refresh), then 8 blocks: 5 full ticks on full rings
FULL = DiTConfig(dim=5120, ffn_dim=13824, freq_dim=256, num_heads=40, num_layers=40)


def _plan(cfg, **kw):
    prof = Profile.resident("bf16", 1024.0, schedule="batched", **kw)
    return make_plan(prof, cfg, HW[1] * 8, HW[0] * 8)


def _video(engine, inputs, after_capture=None):
    """A video of BLOCKS blocks x 4 steps, drained at block 4; each block's final latents (on the host).
    after_capture(): entered once the graph is captured, for the remaining ticks (a context manager factory)."""
    ctx, ref, mot, audios = inputs
    engine.start(ctx, ref, mot, 4, seed=3)
    x = {block_of(g): engine.initial_latents(block_of(g)) for g in range(BLOCKS)}
    ctxm = None
    try:
        for tick in ticks(BLOCKS, 4, drain_before=[4]):
            if after_capture is not None and ctxm is None and engine.graphs.captures:
                ctxm = after_capture()
                ctxm.__enter__()
            outs = engine.run_works(tick, [x[w.idx] for w in tick],
                                    [audios[4 * w.idx.clip + w.idx.block] for w in tick])
            x.update({w.idx: o for w, o in zip(tick, outs)})
    finally:
        if ctxm is not None:
            ctxm.__exit__(None, None, None)
    return [x[block_of(g)].float().cpu() for g in range(BLOCKS)]


def _engines(tiny_ckpt, device, dtype, backend):
    ckpt, lora = tiny_ckpt
    out = []
    for graphed in (False, True):
        model = load_dit(ckpt, lora=lora, dtype=dtype)
        plan = _plan(model.cfg, cuda_graphs="on" if graphed and device == "cuda" else "off")
        engine = Engine.build(model, plan, device)
        if graphed and backend == "recorded":
            engine.graphs = ForwardGraphs(model, backend="recorded")
        assert (engine.graphs is not None) == graphed
        out.append(engine)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_video_equals_eager_video(tiny_ckpt, dtype, video_inputs):
    """Every block's latents bit for bit; one capture in the steady segment, replays over all four ring offsets,
    the drain's narrower calls eager (and the graph released for them)."""
    eager, graphed = _engines(tiny_ckpt, "cpu", dtype, "recorded")
    inputs = video_inputs(eager.model.cfg, BLOCKS, HW)
    want = _video(eager, inputs)
    got = _video(graphed, inputs)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    st = graphed.stats()["graphs"]
    # segment 2: 8 blocks -> 5 ticks of 4 on full rings: the first eager (the warm-up), the second captured
    assert st["captures"] == 1 and st["replays"] == 4 and not st["disabled"]
    assert graphed.graphs.graph is None  # the drain's narrower calls released it
    calls = sum(1 for _ in ticks(BLOCKS, 4, drain_before=[4]))
    assert st["eager_calls"] + st["replays"] == calls


def test_positions_left_stale_change_the_frames(tiny_ckpt, monkeypatch, video_inputs):
    """The engine test sees a graph whose ring writes stay where the capture put them (the positions not copied
    in): the frames differ. So the equality above is not the stand-in hiding the host's values."""
    eager, graphed = _engines(tiny_ckpt, "cpu", torch.float32, "recorded")
    inputs = video_inputs(eager.model.cfg, BLOCKS, HW)
    want = _video(eager, inputs)
    load = graphs_mod._Graph.load

    def stale(self, x, t, audio, call):
        keep = [p.clone() for p in self.pos]
        load(self, x, t, audio, call)
        if self.graph.ops:  # after the capture: the capture's positions again
            for p, k in zip(self.pos, keep):
                p.copy_(k)

    monkeypatch.setattr(graphs_mod._Graph, "load", stale)
    got = _video(graphed, inputs)
    assert graphed.stats()["graphs"]["replays"] == 4
    assert not all(torch.equal(a, b) for a, b in zip(want, got))


def test_recorded_graph_bakes_host_values():
    """RecordedGraph replays what a CUDA graph would: a static tensor's new values, the capture's Python ints."""
    g = torch.Generator().manual_seed(5)
    static, weight = torch.randn(4, 8, generator=g), torch.randn(8, 3, generator=g)
    holder = {"n": 2}
    graph = RecordedGraph()
    out = graph.capture(lambda: (static * holder["n"]) @ weight + static[:, :3].sum())
    assert torch.equal(out, (static * 2) @ weight + static[:, :3].sum())
    new = torch.randn(4, 8, generator=g)
    static.copy_(new)
    holder["n"] = 7  # a host value: baked at 2 in the replay
    graph.replay()
    assert torch.equal(out, (new * 2) @ weight + new[:, :3].sum())


def test_calls_on_host_caches_never_capture(tiny_ckpt, video_inputs):
    """Host step caches (their windows are copied by host-side ranges) run eagerly through ForwardGraphs."""
    ckpt, lora = tiny_ckpt
    model = load_dit(ckpt, lora=lora, dtype=torch.float32)
    prof = Profile.from_name("12gb", quant="bf16", attention="sdpa", kv_dtype="bf16", blocks_resident="all",
                             schedule="batched", cuda_graphs="auto")
    plan = make_plan(prof, model.cfg, HW[1] * 8, HW[0] * 8)
    assert set(plan.kv_caches) == {"host"} and not plan.cuda_graphs and "bf16" in plan.graphs_why
    engine = Engine.build(model, plan, "cpu")
    engine.graphs = ForwardGraphs(model, backend="recorded")
    _video(engine, video_inputs(model.cfg, BLOCKS, HW))
    st = engine.stats()["graphs"]
    assert st["captures"] == 0 and st["replays"] == 0 and st["eager_calls"] == sum(1 for _ in ticks(BLOCKS, 4, [4]))


def test_a_failed_capture_runs_eagerly_and_says_so(tiny_ckpt, monkeypatch, video_inputs):
    eager, graphed = _engines(tiny_ckpt, "cpu", torch.float32, "recorded")
    said = []
    graphed.graphs.log = said.append

    def fails(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(RecordedGraph, "capture", fails)
    inputs = video_inputs(eager.model.cfg, BLOCKS, HW)
    assert all(torch.equal(a, b) for a, b in zip(_video(eager, inputs), _video(graphed, inputs)))
    st = graphed.stats()["graphs"]
    assert st["captures"] == 0 and st["replays"] == 0 and "stream is capturing" in st["disabled"]
    assert len(said) == 1 and said[0].startswith("CUDA graphs off for this run")


def test_a_new_video_and_a_sink_refresh_release_the_graph(tiny_ckpt, video_inputs):
    eager, graphed = _engines(tiny_ckpt, "cpu", torch.float32, "recorded")
    inputs = video_inputs(graphed.model.cfg, BLOCKS, HW)
    ctx, ref, mot, audios = inputs
    graphed.start(ctx, ref, mot, 4, seed=3)
    for tick in ticks(BLOCKS, 4, drain_before=[4]):  # up to the first replay
        x = [graphed.initial_latents(w.idx) for w in tick]
        graphed.run_works(tick, x, [audios[0]] * len(tick))
        if graphed.graphs.graph is not None:
            break
    held = graphed.graphs.graph.held
    assert graphed.sink in held and graphed.context in held
    graphed.refresh_sink(ref, mot)
    assert graphed.graphs.graph is None
    assert graphed.graphs.captures == 1


def test_planner_resolves_cuda_graphs():
    """auto: on where every block and step cache is on the GPU in bf16, a call runs every step, and the pool's
    memory costs nothing else; on: that, or a one-line error; off; and never without a CUDA GPU."""
    roomy = make_plan(Profile.from_name("h100-80", cuda_graphs="auto", vram_budget_gib=78.0), FULL, 704, 384)
    assert roomy.cuda_graphs and len(roomy.resident) == 40 and roomy.gpu_kv_sink > 0
    act = next(it for it in roomy.items if it.what.startswith("activations"))
    assert "graph" in act.what
    tight = make_plan(Profile.from_name("h100-80", cuda_graphs="auto"), FULL, 704, 384)
    off = make_plan(Profile.from_name("h100-80", cuda_graphs="off"), FULL, 704, 384)
    assert not tight.cuda_graphs and "sink room" in tight.graphs_why
    assert (tight.resident, tight.gpu_kv_sink) == (off.resident, off.gpu_kv_sink)
    forced = make_plan(Profile.from_name("h100-80", cuda_graphs="on"), FULL, 704, 384)
    assert forced.cuda_graphs and forced.peak_bytes <= 76 * 2**30
    streamed = make_plan(Profile.from_name("4090", cuda_graphs="auto"), FULL, 704, 384)
    assert not streamed.cuda_graphs and streamed.graphs_why.startswith("needs every block resident")
    with pytest.raises(LowvramError, match="cuda_graphs=on needs the step caches on the GPU"):
        make_plan(Profile.from_name("4090", cuda_graphs="on", blocks_resident="all", vram_budget_gib=200.0),
                  FULL, 704, 384)
    seq = make_plan(Profile.resident("fp8", 200.0, cuda_graphs="auto"), FULL, 704, 384)
    assert not seq.cuda_graphs and "held steps" in seq.graphs_why
    cpu = make_plan(Profile.from_name("h100-80", cuda_graphs="on", vram_budget_gib=78.0), FULL, 704, 384,
                    device_type="cpu")
    assert not cpu.cuda_graphs and cpu.graphs_why == "needs a CUDA GPU"
    assert parse_set(["cuda_graphs=on"]) == {"cuda_graphs": "on"}
    with pytest.raises(LowvramError, match="expected one of auto, on, off"):
        parse_set(["cuda_graphs=yes"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_cuda_graph_video_equals_eager_and_replays_without_sync(tiny_ckpt, attention, video_inputs):
    """torch.cuda.CUDAGraph: the same latents bit for bit, and after the capture no tick synchronises the host
    (torch.cuda.set_sync_debug_mode("error") raises on the first)."""
    eager, graphed = _engines(tiny_ckpt, "cuda", torch.bfloat16, "cuda")
    for e in (eager, graphed):
        e.model.attention = attention
    inputs = video_inputs(eager.model.cfg, BLOCKS, HW)
    _video(eager, inputs)  # Triton's compilation and autotuning, cuDNN's plans
    want = _video(eager, inputs)

    class NoSync:
        def __enter__(self):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")

        def __exit__(self, *exc):
            torch.cuda.set_sync_debug_mode(0)

    got = _video(graphed, inputs, after_capture=NoSync)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    st = graphed.stats()["graphs"]
    assert st["captures"] == 1 and st["replays"] == 4 and not st["disabled"]


def test_lowvram_plan_says_whether_the_calls_are_graphed(tiny_ckpt):
    """`lowvram plan` (for a named card: CUDA) prints the resolved cuda_graphs and why; an impossible "on" is a
    one-line error with exit code 2."""
    from click.testing import CliRunner

    from lowvram.cli.main import cli

    ckpt, _ = tiny_ckpt
    common = ["plan", "--ckpt-dir", str(ckpt), "--size", "128*128", "--set", "quant=bf16"]
    on = CliRunner().invoke(cli, [*common, "--profile", "h100-80", "--set", "cuda_graphs=on"])
    assert on.exit_code == 0, on.output
    assert "CUDA graphs on (cuda_graphs on): the steady calls replay a captured call" in on.output
    assert "schedule sequential instead (1 per call" in on.output  # the comparison plans without forcing graphs
    off = CliRunner().invoke(cli, [*common, "--profile", "h100-80"])
    assert "CUDA graphs off (cuda_graphs off)" in off.output
    bad = CliRunner().invoke(cli, [*common, "--profile", "4090", "--set", "cuda_graphs=on"])
    assert bad.exit_code == 2 and "cuda_graphs=on needs the step caches on the GPU" in bad.output
    assert "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1
