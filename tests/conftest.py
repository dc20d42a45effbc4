"""Shared fixtures: the tiny checkpoint (written once per session) and a private prompt cache."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # kernels run in Triton's interpreter on the CPU (before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one CPU thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny
    convolutions on a busy machine spend more on thread hand-offs than on the work (30x measured), and the CPU
    kernels' reduction order, so their last bits, depends on the thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def torch_attention(monkeypatch):
    """The attention kernels' torch fallbacks on the CPU instead of Triton's interpreter (~5 s per tiny-model
    forward with triton8 here): for whole-model tests whose subject is the caches and the engine, not the
    kernels, which tests/test_kernels_attention.py and tests/test_kv_cache.py run interpreted."""
    monkeypatch.setattr("lowvram.kernels.attention.triton_usable", lambda x: x.is_cuda)
    monkeypatch.setattr("lowvram.kernels.attention8.triton_usable", lambda x: x.is_cuda)


@pytest.fixture(scope="session", autouse=True)
def _private_prompt_cache(tmp_path_factory):
    old = os.environ.get("LOWVRAM_CACHE")
    os.environ["LOWVRAM_CACHE"] = str(tmp_path_factory.mktemp("lowvram-cache"))
    yield
    if old is None:
        os.environ.pop("LOWVRAM_CACHE", None)
    else:
        os.environ["LOWVRAM_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """(ckpt_dir, lora_path) of the tiny checkpoint in the real layout."""
    from lowvram.demo.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def small_tmpfs(tmp_path):
    """mount(size, readonly=False) -> a fresh tmpfs of `size` ("2m") under tmp_path: a real full (or
    read-only) disk. Needs root and mount; the test is skipped (with the reason) where they are not available."""
    import shutil
    import subprocess

    mounted = []

    def mount(size: str = "2m", readonly: bool = False):
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("a real full disk needs root and mount(8) to mount a small tmpfs")
        d = tmp_path / f"tmpfs{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if readonly else ""), "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture
def enospc(monkeypatch):
    """inject(module, name, budget): make `module.name(fd, data, *rest)` (an os.write/os.pwrite-like
    function) fail with ENOSPC once `budget` bytes went through, after writing what still fits, as a real
    disk does."""
    import errno

    def inject(module, name: str, budget: int):
        real = getattr(module, name)
        left = [budget]

        def write(fd, data, *rest):
            data = memoryview(data).cast("B")
            if left[0] <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = real(fd, data[: left[0]], *rest)
            left[0] -= n
            return n

        monkeypatch.setattr(module, name, write)

    return inject


def load_tool(name: str):
    """tools/<name>.py as a module (the tools are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def user_path():
    """tools/user_path.py as a module (the GPU driver's pieces that need no GPU)."""
    return load_tool("user_path")


@pytest.fixture(scope="session")
def trace_forward():
    """tools/trace_forward.py as a module (its summaries of a profiled span)."""
    return load_tool("trace_forward")


@pytest.fixture(scope="session")
def video_inputs():
    """make(cfg, blocks, hw, seed=0) -> (umT5 context [6, text_dim], ref [1, 16, 1, h, w], motion latents
    [1, 16, 19, h, w], one audio block [1, layers, dim, 12] per block): a video's random inputs on the host, as the
    pipeline gives them to Engine.start and run_works."""
    def make(cfg, blocks: int, hw: tuple[int, int], seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        ctx = torch.randn(6, cfg.text_dim, generator=g)
        ref, mot = torch.randn(1, 16, 1, *hw, generator=g), torch.randn(1, 16, 19, *hw, generator=g)
        audios = [torch.randn(1, cfg.num_audio_layers, cfg.audio_dim, 12, generator=g) for _ in range(blocks)]
        return ctx, ref, mot, audios

    return make
