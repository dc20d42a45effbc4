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
