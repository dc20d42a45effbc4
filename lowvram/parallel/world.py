"""The process group of one pipeline run, and the watch that turns any rank's fault into one line everywhere.

A rank learns its place from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT: the env:// rendezvous); `lowvram.parallel.launch` sets the same variables for its own children
and adds LOWVRAM_TPP_STORE=host:port, a TCPStore the launcher hosts (no port is guessed, and the store
outlives any rank). Backends: gloo on the CPU; on GPUs one group whose CPU tensors go through gloo
(conditioning, control) and CUDA tensors through NCCL (block latents).

Nothing waits blindly. Every wait polls its work and, between polls, `Watch.check`: the store's `abort`
key (the first fault, one line naming the rank and the cause; `compare_set` keeps the first), its `stop`
key (Ctrl-C / SIGTERM / should_stop on any rank or the launcher: every rank stops at its next block
boundary), and the other ranks' heartbeats (a thread adds 1 to `hb/<rank>` every HEARTBEAT_S; one that stays
still STALE_S means that rank is dead or frozen). A communication error waits briefly for the abort key
(the launcher or the failing rank names the root cause) before naming the lost peer itself. The process
group's own timeout (TIMEOUT_S, also the longest a started transfer may stall) is only a backstop.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from lowvram.errors import LowvramError

STORE_ENV = "LOWVRAM_TPP_STORE"  # host:port of the launcher's TCPStore (absent under torchrun)
TIMEOUT_ENV = "LOWVRAM_TPP_TIMEOUT_S"
HEARTBEAT_S = 0.5
STALE_S = 10.0
POLL_S = 0.05  # store checks at most this often
GRACE_S = 2.0  # after a communication error, how long to wait for the root cause in the abort key


def timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, "300"))


class PeerFailed(LowvramError):
    """Another rank (or the launcher) failed; the message names it. Exit code 3: a consequence, not a cause."""

    exit_code = 3


class StopRequested(Exception):
    """A stop was requested (any rank's signal, the launcher's): stop at this block boundary."""


def env_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when this process is one rank of a launched group, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, size, int(os.environ.get("LOCAL_RANK", rank))


@dataclass
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device
    store: object  # PrefixStore("lowvram", ...): the control keys
    launched: bool  # by lowvram.parallel.launch (else torchrun or another launcher)
    _hb: threading.Thread | None = field(default=None, repr=False)
    _hb_stop: threading.Event = field(default_factory=threading.Event, repr=False)
    store_error: str | None = None

    @classmethod
    def init(cls, device_type: str) -> "World":
        """Join the process group described by the environment (see the module docstring)."""
        import torch.distributed as dist

        rank, size, local = env_world()
        if device_type == "cuda":
            if local >= torch.cuda.device_count():
                raise LowvramError(f"rank {rank} would use cuda:{local} but this machine has "
                                   f"{torch.cuda.device_count()} GPU(s); start at most that many ranks per machine")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
            backend = "cpu:gloo,cuda:nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        timeout = timedelta(seconds=timeout_s())
        addr = os.environ.get(STORE_ENV)
        if addr:
            host, _, port = addr.rpartition(":")
            base = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=60))
            dist.init_process_group(backend, store=dist.PrefixStore("pg", base), rank=rank, world_size=size,
                                    timeout=timeout)
        else:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size, timeout=timeout)
            base = dist.distributed_c10d._get_default_store()
        world = cls(rank, size, local, device, dist.PrefixStore("lowvram", base), bool(addr))
        world._start_heartbeat()
        return world

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._hb_stop.is_set():
                try:
                    self.store.add(f"hb/{self.rank}", 1)
                except Exception as e:  # the store is gone: its host (the launcher, or rank 0) has exited
                    self.store_error = str(e).splitlines()[0] if str(e) else type(e).__name__
                    return
                self._hb_stop.wait(HEARTBEAT_S)

        self._hb = threading.Thread(target=beat, name="lowvram-heartbeat", daemon=True)
        self._hb.start()

    def close(self) -> None:
        """Leave the group after a clean run (every transfer is complete)."""
        import torch.distributed as dist

        self._hb_stop.set()
        if dist.is_initialized():
            dist.destroy_process_group()


class Watch:
    """Checks for faults and stop requests; `wait` polls a transfer with these checks between polls."""

    def __init__(self, world: World, describe: str, local_stop=lambda: False):
        self.world, self.describe, self.local_stop = world, describe, local_stop
        self.rank = world.rank
        self._next = 0.0
        self._next_hb = 0.0
        self._beats: dict[int, tuple[int, float]] = {}
        self._stop_sent = False
        self.done: set[int] = set()  # ranks that finished their part (no longer beat, no longer checked)
        self.timeout = timeout_s()
        self.stopping = False  # a stop is being carried out: further stop requests are not raised again

    # ------------------------------------------------------------------ faults
    def abort(self, message: str) -> str:
        """Record `message` as the run's fault unless one is recorded; returns the recorded one."""
        try:
            return _text(self.world.store.compare_set("abort", "", message))
        except Exception:
            return message

    def fail(self, message: str):
        raise PeerFailed(self.abort(message))

    def lost(self, peer: int | None, err: Exception):
        """A transfer failed: name the root cause if another rank or the launcher does within GRACE_S."""
        t_end = time.monotonic() + GRACE_S
        while time.monotonic() < t_end:
            cause = self._get("abort")
            if cause:
                raise PeerFailed(cause)
            time.sleep(0.05)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        who = f"rank {peer}" if peer is not None else "a peer"
        self.fail(f"rank {self.rank} lost {who}: {first}")

    # ------------------------------------------------------------------ checks
    def _get(self, key: str) -> str | None:
        st = self.world.store
        try:
            return _text(st.get(key)) if st.check([key]) else None
        except Exception as e:
            raise PeerFailed(f"rank {self.rank} lost the rendezvous store ({str(e).splitlines()[0][:120]}): "
                             "the launcher or the rank hosting it has exited") from None

    def stop_requested(self) -> bool:
        if self.local_stop() and not self._stop_sent:
            self._stop_sent = True
            self.world.store.set("stop", str(self.rank))
        return self._stop_sent or self._get("stop") is not None

    def check(self, force: bool = False) -> None:
        """Raise PeerFailed on a recorded fault or a silent rank, StopRequested on a stop request."""
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + POLL_S
        if self.world.store_error:
            raise PeerFailed(f"rank {self.rank} lost the rendezvous store ({self.world.store_error})")
        cause = self._get("abort")
        if cause:
            raise PeerFailed(cause)
        if not self.stopping and self.stop_requested():
            raise StopRequested()
        if now >= self._next_hb:
            self._next_hb = now + 1.0
            self._check_heartbeats(now)

    def _check_heartbeats(self, now: float) -> None:
        for r in range(self.world.size):
            if r == self.rank or r in self.done:
                continue
            if self._get(f"done/{r}") is not None:
                self.done.add(r)
                continue
            n = int(self.world.store.add(f"hb/{r}", 0))
            last = self._beats.get(r)
            if last is None or n != last[0]:
                self._beats[r] = (n, now)
            elif now - last[1] > STALE_S:
                self.fail(f"rank {r} stopped responding (no heartbeat for {now - last[1]:.0f} s): it died or froze")

    # ------------------------------------------------------------------ waits
    def wait(self, work, what: str, peer: int | None = None, own=None, stall: bool = True,
             cuda: bool = False) -> float:
        """Wait for `work` (a torch.distributed Work) with `check` between polls.

        cuda: an NCCL work, polled with is_completed() (its wait() only orders this thread's stream after it).
        Else a gloo work, whose p2p is_completed() stays False until wait() returns and whose wait(timeout)
        closes the connection when it expires: a helper thread waits, this one polls. Returns the seconds
        spent waiting on the peer: time before this rank's own queued compute (`own`, a CUDA event recorded
        after it) finished does not count. stall: fail after TIMEOUT_S."""
        t0 = time.perf_counter()
        t_own = None if own is not None else t0
        if cuda:
            ready, errors = work.is_completed, []
        else:
            ready, errors = _waiter(work)
        pause = 1e-4
        while True:
            try:
                done = ready()
            except RuntimeError as e:
                errors.append(e)
                done = True
            if done:
                break
            if t_own is None and own.query():
                t_own = time.perf_counter()
            self.check()
            if stall and time.perf_counter() - t0 > self.timeout:
                self.fail(f"rank {self.rank} waited {self.timeout:.0f} s for {what} from rank {peer} "
                          f"(set {TIMEOUT_ENV} for a longer limit)")
            time.sleep(pause)
            pause = min(2 * pause, 2e-3)
        if cuda and not errors:
            try:
                work.wait()  # orders this rank's stream after the transfer (no host wait)
            except RuntimeError as e:
                errors.append(e)
        if errors:
            self.lost(peer, errors[0])
        t1 = time.perf_counter()
        return max(0.0, t1 - (t_own if t_own is not None else t1))

    def wait_key(self, key: str, what: str) -> str:
        """Wait (with checks, no time limit: the ranks' heartbeats bound it) until the store holds `key`."""
        pause = 1e-3
        while True:
            value = self._get(key)
            if value is not None:
                return value
            self.check()
            time.sleep(pause)
            pause = min(2 * pause, 0.05)


def _waiter(work):
    """(ready, errors) of a thread that blocks in work.wait(); left behind (a daemon) if the run aborts."""
    done, errors = threading.Event(), []

    def run():
        try:
            work.wait()
        except BaseException as e:  # noqa: BLE001 - handed to the polling thread
            errors.append(e)
        finally:
            done.set()

    threading.Thread(target=run, name="lowvram-wait", daemon=True).start()
    return done.is_set, errors


def _text(v) -> str:
    return v.decode() if isinstance(v, (bytes, bytearray)) else str(v)
