"""tools/gpu_ab.py's pieces that need no GPU: the base part imports the older tree's code, not the installed one."""

import os
import subprocess
import sys

from conftest import load_tool

gpu_ab = load_tool("gpu_ab")


def _tree(root, mark):
    for pkg in ("lowvram", "lowvram/model", "kernels", "quantize", "profiles"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text(f"MARK = {mark!r}\n")
    return root


def test_package_view_imports_the_given_tree(tmp_path):
    """The view's `lowvram` is the tree's, its kernels/quantize/profiles folders as lowvram.kernels, ... (as
    pyproject.toml installs them), ahead of the installed package; made twice, the second replaces the first."""
    probe = "import lowvram, lowvram.model, lowvram.kernels, lowvram.quantize, lowvram.profiles as p; " \
            "print(lowvram.MARK, lowvram.model.MARK, lowvram.kernels.MARK, lowvram.quantize.MARK, p.MARK)"
    for mark in ("older", "newer"):
        view = gpu_ab._package_view(_tree(tmp_path / mark, mark), tmp_path / "view")
        env = {**os.environ, "PYTHONPATH": str(view)}
        out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [mark] * 5


def test_base_part_without_a_tree_is_refused(tmp_path, capsys):
    assert gpu_ab.main(["--quick", "--parts", "base", "--out", str(tmp_path)]) == 2
    assert "--base DIR" in capsys.readouterr().err
