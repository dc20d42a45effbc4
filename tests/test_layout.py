"""The checkout's top-level folders against the packages their names collide with."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_a_python_started_in_the_checkout_gets_the_installed_kernels_package():
    """`python -m lowvram...` in the checkout's root (and the rank/worker processes started that way) puts the root
    first on sys.path, where kernels/ would shadow the Hugging Face `kernels` package transformers imports; it hands
    the import over instead, and lowvram's kernels still import as lowvram.kernels."""
    if importlib.util.find_spec("kernels") is None or "site-packages" not in str(importlib.util.find_spec("kernels").origin):
        pytest.skip("the Hugging Face kernels package is not installed here")
    code = ("import kernels, lowvram.kernels.sage as s; "
            "print(kernels.__file__); print(hasattr(kernels, 'get_kernel')); print(s.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    origin, has_api, name = out.split()
    assert not Path(origin).resolve().is_relative_to(ROOT / "kernels") and has_api == "True"
    assert name == "lowvram.kernels.sage"
