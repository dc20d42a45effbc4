"""tools/trace_forward.py's summary of a profiled span (what bench.py --trace-ticks reports): the union of kernel
intervals over streams and the copy directions."""

import random

import pytest


def test_union_ms_against_a_grid(trace_forward):
    rng = random.Random()
    for _ in range(50):
        spans = []
        for _ in range(rng.randint(1, 12)):
            a = rng.randint(0, 200)
            spans.append((a, a + rng.randint(0, 40)))
        covered = {t for a, b in spans for t in range(a, b)}  # unit cells [t, t + 1) of integer intervals
        assert trace_forward.union_ms(spans) == len(covered)


def test_union_ms_overlapping_streams(trace_forward):
    # a kernel on the copy stream inside one on the compute stream adds nothing; a gap after does not count
    assert trace_forward.union_ms([(0.0, 10.0), (2.0, 5.0), (12.0, 13.5)]) == pytest.approx(11.5)
    assert trace_forward.union_ms([]) == 0.0


def test_copy_direction(trace_forward):
    assert trace_forward.copy_direction("Memcpy HtoD (Pinned -> Device)") == "h2d"
    assert trace_forward.copy_direction("Memcpy DtoH (Device -> Pinned)") == "d2h"
    assert trace_forward.copy_direction("Memcpy DtoD (Device -> Device)") is None
    assert trace_forward.copy_direction("void at::native::vectorized_elementwise_kernel") is None
