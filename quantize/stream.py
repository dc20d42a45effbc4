"""The threads of `lowvram quantize`: reading ahead, writing behind, and hashing beside the arithmetic.

    reader thread:  source tensor (+ its LoRA pair) read into a reused host buffer (BufferRing), up to
                    `depth` tensors ahead
    main thread:    LoRA merge, row quantization, SQNR (on the CPU or a GPU), one tensor after the other
    writer thread:  each result written at its planned offset, up to `depth` results behind; a shard closed
    hashing pool:   SHA-256 of every source file from the start, of every output shard once it is closed

Every hand-off is bounded: the source tensors live in 2 * depth + 1 buffers of the largest one's size (at
full size 5 x 141 MB, of which only those ever used are resident), the converted ones waiting to be written
are at most `depth`, plus what glibc's heap keeps as the threads' allocations interleave
(tests/test_quantize_ram.py).
Reads, writes and hashlib release the GIL, so the threads overlap with torch on the main thread.
An error on any thread is raised on the main thread (at its next hand-off), which then stops the others:
what is queued is cancelled, a hash in progress gives up at its next chunk, a read or write in progress
finishes. `depth=0` runs every step inline on the calling thread in the same order: the serial path that
tests/test_quantize_stream.py compares the pipelined one with, byte for byte.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import torch

from lowvram.quantize.format import sha256_file


_END = object()


class _Stopped(Exception):
    """Work given up because the conversion failed (a hash at its next chunk, a read waiting for a buffer)."""


def _done(fn: Callable, *args) -> Future:
    """fn(*args) run now, as a finished Future (the inline path: its error is raised here, at once)."""
    fut: Future = Future()
    fut.set_result(fn(*args))
    return fut


class ReadAhead:
    """Iterate (item, fn(item)) in order, fn running on one worker thread at most `depth` items ahead."""

    def __init__(self, fn: Callable, items: Iterable, depth: int):
        self._fn, self._items, self._depth = fn, iter(items), depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lowvram-read") if depth > 0 else None
        self._queue: deque[tuple[object, Future]] = deque()

    def _submit(self) -> None:
        item = next(self._items, _END)
        if item is not _END:
            self._queue.append((item, self._pool.submit(self._fn, item)))

    def __iter__(self):
        if self._pool is None:
            for item in self._items:
                yield item, self._fn(item)
            return
        for _ in range(self._depth):
            self._submit()
        while self._queue:
            item, fut = self._queue.popleft()
            result = fut.result()  # the reader's error, raised here at its item
            del fut
            self._submit()  # keep `depth` reads queued while the caller works on this one
            yield item, result
            del result  # not held while the next read is awaited

    def close(self) -> None:
        """Cancel the queued reads and wait for the one in progress."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._queue.clear()


class BufferRing:
    """`count` host buffers of `nbytes` bytes each, reused: take() waits for a free one, give() returns it.

    Reading into memory that is already resident spares the page faults (and the kernel's zeroing) that a
    fresh allocation costs on every 4 KiB of every tensor, and fixes what the reader can hold. The buffer
    given back last is taken first: the hot ones are reused, and one that is never needed is never touched
    (no RSS). close() makes a take() that waits, or comes later, raise: a reader blocked on a full ring stops
    with the run."""

    def __init__(self, count: int, nbytes: int):
        self._free = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(count)]
        self._cond = threading.Condition()
        self._closed = False

    def take(self) -> torch.Tensor:
        with self._cond:
            while not self._free and not self._closed:
                self._cond.wait()
            if self._closed:
                raise _Stopped("the buffer ring is closed")
            return self._free.pop()

    def give(self, buf: torch.Tensor) -> None:
        with self._cond:
            self._free.append(buf)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class WriteBehind:
    """fn(*args) calls run in order on one worker thread, at most `depth` unfinished; `submit` waits for
    the oldest when that many are pending, and raises the first error of any call before it."""

    def __init__(self, depth: int):
        self._depth = depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lowvram-write") if depth > 0 else None
        self._pending: deque[Future] = deque()

    def submit(self, fn: Callable, *args) -> None:
        if self._pool is None:
            fn(*args)
            return
        while self._pending and (self._pending[0].done() or len(self._pending) >= self._depth):
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def wait(self) -> None:
        """Every call finished; the first error raised."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Cancel the queued calls and wait for the one in progress; errors are dropped (the caller has one)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()


class Busy:
    """Seconds each stage kept its thread busy (summed over a pool's threads): where a conversion's time went."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def timed(self, stage: str, fn: Callable) -> Callable:
        def run(*args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                with self._lock:
                    self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0

        return run


class Hashes:
    """SHA-256 records ({file, size, sha256}) of files, computed on `workers` threads (0: inline, at add()).

    on_bytes(n) is called from those threads after each chunk (rich's Progress.update is thread-safe); the
    time spent is added to busy's "hashing"."""

    def __init__(self, workers: int, on_bytes: Callable[[int], None] | None = None, busy: Busy | None = None):
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="lowvram-hash") if workers > 0 else None
        self._on_bytes = on_bytes
        self._stop = threading.Event()
        self._hash = busy.timed("hashing", self._record) if busy is not None else self._record

    def _record(self, path: Path, name: str) -> dict:
        def chunk(n: int) -> None:
            if self._stop.is_set():
                raise _Stopped(name)
            if self._on_bytes is not None:
                self._on_bytes(n)

        return {"file": name, "size": path.stat().st_size, "sha256": sha256_file(path, on_chunk=chunk)}

    def add(self, path: Path, name: str) -> Future:
        if self._pool is None:
            return _done(self._hash, path, name)
        return self._pool.submit(self._hash, path, name)

    def close(self, stop: bool = False) -> None:
        """Wait for the hashes (stop: make those in progress give up at their next chunk, drop the queued)."""
        if stop:
            self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=stop)
