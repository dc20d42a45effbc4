"""The prompt cache never stops a run: missing, read-only or full, it warns once and is skipped."""

import os

import pytest
import torch

from lowvram.io import prompt_cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWVRAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(prompt_cache, "_warned", set())
    lines = []
    return tmp_path / "cache" / "prompts", lines


def _ctx(n=7, seed=0):
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))


def test_round_trip_and_notes(cache):
    folder, lines = cache
    ctx = _ctx()
    assert prompt_cache.load("k") is None
    assert prompt_cache.store("k", ctx, log=lines.append)
    assert torch.equal(prompt_cache.load("k"), ctx)
    assert prompt_cache.write_note("t5-cosine-x.txt", "0.998\n", log=lines.append)
    assert prompt_cache.read_note("t5-cosine-x.txt") == "0.998\n" and lines == []
    (folder / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert prompt_cache.load("bad") is None  # a damaged entry is a miss


def test_key_follows_the_t5_file_not_its_name(tmp_path):
    t5 = tmp_path / "a" / "t5.pth"
    t5.parent.mkdir()
    t5.write_bytes(os.urandom(64))
    (tmp_path / "b").mkdir()
    os.link(t5, tmp_path / "b" / "t5.pth")               # quantize's int8/ and fp8/ hold hard links
    key = prompt_cache.prompt_key("a person", t5, "bf16")
    assert prompt_cache.prompt_key("a person", tmp_path / "b" / "t5.pth", "bf16") == key
    assert prompt_cache.prompt_key("a person", t5, "int8") != key
    assert prompt_cache.prompt_key("a person.", t5, "bf16") != key
    other = tmp_path / "c.pth"
    other.write_bytes(t5.read_bytes())                   # the same bytes in another file: another identity
    assert prompt_cache.prompt_key("a person", other, "bf16") != key


def test_read_only_cache_warns_once_and_runs(cache, request, monkeypatch):
    folder, lines = cache
    if os.geteuid() == 0:  # root writes into any folder: a read-only file system it is
        disk = request.getfixturevalue("small_tmpfs")("1m", readonly=True)
        monkeypatch.setenv("LOWVRAM_CACHE", str(disk))
        folder = disk  # prompts/ cannot even be created there
    else:
        folder.mkdir(parents=True)
        folder.chmod(0o500)
    try:
        assert prompt_cache.load("k") is None
        assert not prompt_cache.store("k", _ctx(), log=lines.append)
        assert not prompt_cache.write_note("n.txt", "x", log=lines.append)
    finally:
        if os.geteuid():
            folder.chmod(0o700)
    assert len(lines) == 1 and "LOWVRAM_CACHE" in lines[0] and "without it" in lines[0], lines


def test_uncreatable_cache_warns_once_and_runs(tmp_path, cache, monkeypatch):
    _, lines = cache
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("LOWVRAM_CACHE", str(tmp_path / "a-file"))  # mkdir fails for root as well
    assert prompt_cache.load("k") is None
    assert not prompt_cache.store("k", _ctx(), log=lines.append)
    assert not prompt_cache.store("k2", _ctx(), log=lines.append)
    assert prompt_cache.read_note("n.txt") is None and not prompt_cache.write_note("n.txt", "x", log=lines.append)
    assert len(lines) == 1
    assert lines[0].startswith("warning: the prompt cache ") and "cannot be created" in lines[0]
    assert "set LOWVRAM_CACHE to a writable folder" in lines[0]


def test_injected_enospc_leaves_no_partial_entry(cache, monkeypatch):
    folder, lines = cache
    folder.mkdir(parents=True)

    def half_then_full(f, data):
        f.write(data[: len(data) // 2])
        f.flush()
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(prompt_cache, "_write", half_then_full)
    assert not prompt_cache.store("k", _ctx(), log=lines.append)
    assert list(folder.iterdir()) == [] and prompt_cache.load("k") is None
    assert len(lines) == 1 and "is full; nothing was cached" in lines[0] and "LOWVRAM_CACHE" in lines[0]


def test_a_real_full_disk(small_tmpfs, monkeypatch):
    disk = small_tmpfs("1m")
    monkeypatch.setenv("LOWVRAM_CACHE", str(disk))
    monkeypatch.setattr(prompt_cache, "_warned", set())
    lines = []
    assert prompt_cache.store("small", _ctx(), log=lines.append)
    big = torch.zeros(512, 1024)  # 2 MiB of float32 on a 1 MiB disk
    assert not prompt_cache.store("big", big, log=lines.append)
    assert sorted(p.name for p in (disk / "prompts").iterdir()) == ["small.safetensors"]
    assert len(lines) == 1 and "is full" in lines[0]
    assert torch.equal(prompt_cache.load("small"), _ctx())


def test_a_cache_hit_imports_nothing_of_umt5(tiny_ckpt, tmp_path):
    """A second run's prompt phase took 9-10 s at full size with the prompt cached: the import of umT5's
    transformers modules, which a hit does not need."""
    import subprocess
    import sys

    from lowvram.io.weights import discover

    ckpt = discover(tiny_ckpt[0])
    env = {**os.environ, "LOWVRAM_CACHE": str(tmp_path / "cache")}
    prompt = f"a cached prompt {os.urandom(4).hex()}"
    ctx = torch.randn(9, 16)
    code = ("import sys, torch; from lowvram.io import prompt_cache; from lowvram.io.weights import discover; "
            "from lowvram.pipeline.encode import encode_prompt; ckpt = discover(sys.argv[1]); "
            "assert prompt_cache.store(prompt_cache.prompt_key(sys.argv[2], ckpt.t5, 'bf16'), torch.load(sys.argv[3])); "
            "out = encode_prompt(ckpt, sys.argv[2], 'cpu', 'bf16', log=print); "
            "assert torch.equal(out, torch.load(sys.argv[3])); "
            "print('loaded:', sorted(m for m in sys.modules if 'umt5' in m or m == 'lowvram.model.text_encoder'))")
    torch.save(ctx, tmp_path / "ctx.pt")
    r = subprocess.run([sys.executable, "-c", code, str(ckpt.root), prompt, str(tmp_path / "ctx.pt")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "from cache" in r.stdout and "loaded: []" in r.stdout, r.stdout
