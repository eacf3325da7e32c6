"""The resumable, rank-sharded, infinite sample order shared by every loader.

Epoch e is a permutation of the dataset drawn from a generator seeded by (seed, e) alone, so the
order never depends on how often a run was stopped. It is padded by wrapping to a multiple of the
world size and rank r takes every W-th entry from r (as torch's DistributedSampler does), so every
rank owns `share_size = ceil(N / W)` positions per epoch and the shares are disjoint up to the
padding. Batches are consecutive runs of positions in this rank's share.

Epoch ends: no drop_last. A batch that reaches the end of the share takes its remaining samples
from the start of the next epoch's share, so every sample is seen exactly once per epoch (up to
padding) and a share smaller than the batch still works. Position = (epoch, index into the
share); because every rank has the same share size and batch size, that state is identical on
all ranks, and restoring it continues the stream exactly.

Horizontal flips are a function of (seed, epoch, sample index) too, drawn from their own stream,
so a resumed run flips the same samples the same way.
"""

from __future__ import annotations

import math

import torch

_MASK64 = (1 << 64) - 1
_PERMUTATION_STREAM, _FLIP_STREAM = 0, 1


def stream_seed(seed: int, epoch: int, stream: int) -> int:
    """A well-mixed 63-bit generator seed for (seed, epoch, stream) (SplitMix64 finaliser)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, epoch, stream))


class ResumableOrder:
    """This rank's position in an infinite stream of epochs; `take(n)` hands out the next n."""

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 (got {num_samples})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) (got rank={rank}, world_size={world_size})")
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.share_size = math.ceil(num_samples / world_size)   # positions per rank per epoch
        self.epoch, self.index = 0, 0
        self._cached: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def share(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample indices (share_size,) long, flips (share_size,) bool) of this rank in `epoch`, on CPU."""
        if epoch not in self._cached:
            n, w = self.num_samples, self.world_size
            perm = torch.randperm(n, generator=_generator(self.seed, epoch, _PERMUTATION_STREAM))
            total = self.share_size * w
            if total > n:  # pad by wrapping (repeatedly, if the world is larger than the dataset)
                perm = perm.repeat(math.ceil(total / n))[:total]
            indices = perm[self.rank:total:w]
            flips = torch.rand(n, generator=_generator(self.seed, epoch, _FLIP_STREAM)) < 0.5
            # Keep the current epoch and its successor: a batch spans at most those two
            # unless the share is smaller than the batch.
            self._cached = {e: v for e, v in self._cached.items() if e >= self.epoch}
            self._cached[epoch] = (indices, flips[indices])
        return self._cached[epoch]

    def take(self, n: int) -> list[tuple[int, int, int]]:
        """Advances by n positions; returns them as (epoch, start, stop) runs of this rank's share."""
        runs = []
        while n > 0:
            stop = min(self.index + n, self.share_size)
            runs.append((self.epoch, self.index, stop))
            n -= stop - self.index
            self.index = stop
            if self.index == self.share_size:  # keep the state normalised: (e + 1, 0), never (e, end)
                self.epoch, self.index = self.epoch + 1, 0
        return runs

    def take_items(self, n: int) -> list[tuple[int, bool]]:
        """The next n positions as (sample index, flip) pairs of plain Python values."""
        items = []
        for epoch, start, stop in self.take(n):
            indices, flips = self.share(epoch)
            items += zip(indices[start:stop].tolist(), flips[start:stop].tolist())
        return items

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or index < 0:
            raise ValueError(f"bad loader state {state}: epoch and index must be >= 0")
        # An index past this rank's share can only come from a run with fewer ranks; rather than
        # refuse to resume, start the next epoch (the partial epoch is not repeated).
        if index >= self.share_size:
            epoch, index = epoch + 1, 0
        self.epoch, self.index = epoch, index

    def copy(self) -> "ResumableOrder":
        other = ResumableOrder(self.num_samples, self.seed, self.rank, self.world_size)
        other.load_state_dict(self.state_dict())
        return other
