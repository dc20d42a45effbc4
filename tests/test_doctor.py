"""`lowvram doctor`: machine facts always, checkpoint files with --ckpt-dir, each problem with its fix."""

import shutil

import pytest

from click.testing import CliRunner

from lowvram.cli.main import cli


def test_doctor_reports_the_machine_and_a_good_checkpoint(tiny_ckpt):
    r = CliRunner().invoke(cli, ["doctor", "--ckpt-dir", str(tiny_ckpt[0])])
    assert r.exit_code == 0, r.output
    for needle in ("python", "torch", "host RAM", "ulimit -l", "config.json", "Wan2.1_VAE.pth", "DiT"):
        assert needle in r.output, needle


def test_doctor_names_a_missing_file_and_how_to_get_it(tiny_ckpt, tmp_path):
    ckpt = shutil.copytree(tiny_ckpt[0], tmp_path / "c")
    (ckpt / "models_t5_umt5-xxl-enc-bf16.pth").unlink()
    r = CliRunner().invoke(cli, ["doctor", "--ckpt-dir", str(ckpt)])
    lines = [l for l in r.output.splitlines() if l.startswith("problem:")]
    assert any("models_t5_umt5-xxl-enc-bf16.pth" in l and "hf download Wan-AI/Wan2.2-S2V-14B --local-dir" in l for l in lines)


def test_doctor_spots_a_truncated_shard(tiny_ckpt, tmp_path):
    ckpt = shutil.copytree(tiny_ckpt[0], tmp_path / "c")
    shard = sorted(ckpt.glob("diffusion_pytorch_model-*"))[0]
    shard.write_bytes(shard.read_bytes()[:-1000])
    r = CliRunner().invoke(cli, ["doctor", "--ckpt-dir", str(ckpt)])
    assert any(shard.name in l and "interrupted download" in l for l in r.output.splitlines()), r.output


def test_doctor_says_which_kernels_run():
    from lowvram.cli.doctor import kernel_status

    row, problem = kernel_status(True, "not installed")
    assert row[1] == "torch only" and "pip install triton" in problem
    row, problem = kernel_status(True, "3.6.0")
    assert row[1].startswith("Triton") and problem is None
    assert kernel_status(False, "3.6.0") == (("kernels", "torch (CPU)"), None)


@pytest.mark.parametrize("backend, dist", [("sage", "sageattention"), ("fa4", "flash-attn-4")])
def test_doctor_says_whether_each_attention_library_can_run(monkeypatch, backend, dist):
    from lowvram.cli.doctor import library_status
    from lowvram.model.attention import library_module

    mod = library_module(backend)
    assert library_status(False, backend) == (dist, "not used on the CPU")
    monkeypatch.setattr(mod, "unavailable", lambda device="cuda": f"{dist} is not importable (ImportError)")
    assert library_status(True, backend) == (dist, f"not used ({dist} is not importable (ImportError))")
    monkeypatch.setattr(mod, "unavailable", lambda device="cuda": None)
    assert f": --attention {backend} runs it on this GPU (" in library_status(True, backend)[1]


def test_doctor_report_exit_code_rule(tiny_ckpt, tmp_path):
    import torch

    from lowvram.cli.doctor import doctor_report
    from lowvram.constants import TOKENIZER_DIR

    good = doctor_report(tiny_ckpt[0])
    assert good.problems == [] and good.exit_code == 0 and good.lines()[-1].startswith("no problems found")
    if not torch.cuda.is_available():  # a CPU machine still runs: a warning, not a problem
        assert any("no CUDA GPU" in w for w in good.warnings)
        assert any(line.startswith("warning: no CUDA GPU") for line in good.lines())
    ckpt = shutil.copytree(tiny_ckpt[0], tmp_path / "c")
    (ckpt / TOKENIZER_DIR / "tokenizer.json").write_text("{}")
    (ckpt / "config.json").write_text((ckpt / "config.json").read_text().replace('"num_heads": ', '"num_heads": "x", "_": '))
    bad = doctor_report(ckpt)
    assert bad.exit_code == 1 and len(bad.problems) == 2, bad.problems
    assert "key 'num_heads' must be an integer" in bad.problems[0]
    assert "tokenizer.json is not a tokenizer" in bad.problems[1]
    assert bad.lines()[-1].startswith("2 problem(s)")
    assert doctor_report(tmp_path / "nowhere").exit_code == 1
    assert doctor_report(None).exit_code == 0  # the machine alone: warnings only
