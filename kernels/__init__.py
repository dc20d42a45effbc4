"""Triton kernels and their torch references (installed as `lowvram.kernels`)."""
