"""Triton kernels and their torch references (installed as `lowvram.kernels`).

This folder sits at the checkout's root (the product's layout), where a Python started in that root (`python -m
lowvram...`, and the rank and worker processes `lowvram` starts that way) finds it first as a top-level package
`kernels`, the name of the Hugging Face package that transformers (5.25 and later) imports. Imported under that
name, it hands the import over to the installed `kernels` package, so neither shadows the other.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        raise ImportError("no module named 'kernels' outside lowvram's checkout (lowvram's own kernels import as "
                          "lowvram.kernels); pip install kernels", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what is here once this file has run
    _spec.loader.exec_module(_module)
