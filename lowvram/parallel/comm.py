"""Block messages between ranks: non-blocking sends and receives, each waited through a `Watch`.

A block's message is its latents [1, 16, 3, h, w] (after the sender's last step) and, while a DiT rank
needs it, the block's audio features [1, L+1, D, 12] fp32: packed as bytes into one buffer, so one
transfer per block per link. A link carries at most one message per tick (the one block that crosses
from the sender's last step to the receiver's first), and a sender waits for its previous message to
that peer before posting the next: bounded memory, and the back-pressure of a slower neighbour shows up
as `send_wait_s`. Receivers post the next block's receive before computing the current one, so the
transfer overlaps the compute on both sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

TAG_BLOCK = 1


@dataclass(frozen=True)
class Spec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' bytes one after the other, as one uint8 tensor on their device."""
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def unpack(buf: torch.Tensor, specs: list[Spec]) -> list[torch.Tensor]:
    """Views of `buf` as the tensors of `specs` (each one's byte offset is a multiple of its element size)."""
    out, off = [], 0
    for s in specs:
        out.append(buf[off:off + s.nbytes].view(s.dtype).view(s.shape))
        off += s.nbytes
    return out


class Links:
    """This rank's block traffic: sends to the downstream rank, receives from the upstream one."""

    def __init__(self, watch, device: torch.device):
        self.watch, self.device = watch, device
        self.cuda = device.type == "cuda"  # block messages go through NCCL there
        self._sent: dict[int, tuple] = {}  # dst -> (work, buffer) of the last message
        self._recv: dict[int, tuple] = {}  # block -> (work, buffer, src)
        self.bytes_sent = self.messages_sent = 0
        self.recv_wait_s = self.send_wait_s = 0.0

    def send(self, tensors: list[torch.Tensor], dst: int, block: int) -> None:
        buf = pack(tensors)
        prev = self._sent.pop(dst, None)
        if prev is not None:
            self.send_wait_s += self.watch.wait(prev[0], f"the receive of block {block - 1}", dst, cuda=self.cuda)
        self._sent[dst] = (dist.isend(buf, dst, tag=TAG_BLOCK), buf)
        self.bytes_sent += buf.numel()
        self.messages_sent += 1

    def post(self, block: int, src: int, specs: list[Spec]) -> None:
        """Post the receive of `block`'s message from `src`."""
        if block in self._recv:
            return
        buf = torch.empty(sum(s.nbytes for s in specs), dtype=torch.uint8, device=self.device)
        self._recv[block] = (dist.irecv(buf, src, tag=TAG_BLOCK), buf, src, specs)

    def take(self, block: int, own=None) -> list[torch.Tensor]:
        """Wait for `block`'s message (posted before) and return its tensors."""
        work, buf, src, specs = self._recv.pop(block)
        self.recv_wait_s += self.watch.wait(work, f"block {block}", src, own=own, cuda=self.cuda)
        return unpack(buf, specs)

    def flush(self) -> None:
        """Wait until every message sent has been received."""
        for dst, (work, _) in list(self._sent.items()):
            self.send_wait_s += self.watch.wait(work, "the last receive", dst, cuda=self.cuda)
        self._sent.clear()

    def stats(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "messages_sent": self.messages_sent,
                "recv_wait_s": round(self.recv_wait_s, 4), "send_wait_s": round(self.send_wait_s, 4)}


def post_broadcast(tensors: list[torch.Tensor], src: int) -> list:
    """Start broadcasting CPU tensors (gloo) from `src`, in place; returns the works to wait on."""
    return [dist.broadcast(t, src, async_op=True) for t in tensors]


def broadcast(watch, tensors: list[torch.Tensor], src: int, what: str) -> None:
    """Broadcast CPU tensors (gloo) from `src`, in place; waited through `watch`."""
    for w in post_broadcast(tensors, src):
        watch.wait(w, what, src)
