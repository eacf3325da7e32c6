"""The resumable, rank-sharded, infinite sample order shared by every loader.

Epoch e is a permutation of the dataset drawn from a generator seeded by (seed, e) alone, so the
order never depends on how often a run was stopped. The epochs, end to end, form one global
stream. Every `take(n)` call is made by all ranks together and consumes the next `n * W`
positions of that stream: rank r gets the r-th run of n of them. So a rank's micro batch is a
contiguous piece of the stream, and the same global positions form the same micro batches
whatever the world size, as long as the micro batch stays the same (what makes a run's
trajectory independent of the number of GPUs, and resharded resumes exact).

Epoch ends: no drop_last and no padding. A batch that reaches the end of an epoch continues at
the start of the next one, so every sample is seen exactly once per epoch. Position = (epoch,
index), index = samples of this epoch consumed by all ranks together; it is the same on every
rank and does not depend on the world size, so a checkpoint written by W ranks resumes on any
other number of ranks at exactly the same place.

Horizontal flips are a function of (seed, epoch, sample index) too, drawn from their own stream,
so a resumed run flips the same samples the same way.
"""

from __future__ import annotations

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
    """The position of all ranks in an infinite stream of epochs; `take(n)` hands this rank its next n."""

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 (got {num_samples})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) (got rank={rank}, world_size={world_size})")
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.epoch, self.index = 0, 0
        self._cached: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def permutation(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample indices (N,) long, flips (N,) bool) of `epoch`, by stream position, on CPU."""
        if epoch not in self._cached:
            n = self.num_samples
            perm = torch.randperm(n, generator=_generator(self.seed, epoch, _PERMUTATION_STREAM))
            flips = torch.rand(n, generator=_generator(self.seed, epoch, _FLIP_STREAM)) < 0.5
            # Keep the current epoch and its successors: a batch spans at most those two
            # unless the dataset is smaller than a batch.
            self._cached = {e: v for e, v in self._cached.items() if e >= self.epoch}
            self._cached[epoch] = (perm, flips[perm])
        return self._cached[epoch]

    def flat_position(self) -> int:
        """Samples of the whole stream consumed so far (all epochs, all ranks)."""
        return self.epoch * self.num_samples + self.index

    def _advance(self, n: int, runs: list | None) -> None:
        while n > 0:
            stop = min(self.index + n, self.num_samples)
            if runs is not None:
                runs.append((self.epoch, self.index, stop))
            n -= stop - self.index
            self.index = stop
            if self.index == self.num_samples:  # keep the state normalised: (e + 1, 0), never (e, end)
                self.epoch, self.index = self.epoch + 1, 0

    def take(self, n: int) -> list[tuple[int, int, int]]:
        """Advances all ranks by n each; returns this rank's n as (epoch, start, stop) runs of permutations."""
        runs: list[tuple[int, int, int]] = []
        self._advance(self.rank * n, None)
        self._advance(n, runs)
        self._advance((self.world_size - 1 - self.rank) * n, None)
        return runs

    def take_items(self, n: int) -> list[tuple[int, bool]]:
        """This rank's next n positions as (sample index, flip) pairs of plain Python values."""
        items = []
        for epoch, start, stop in self.take(n):
            indices, flips = self.permutation(epoch)
            items += zip(indices[start:stop].tolist(), flips[start:stop].tolist())
        return items

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or index < 0:
            raise ValueError(f"bad loader state {state}: epoch and index must be >= 0")
        # An index past the end can only come from a dataset that has shrunk since the checkpoint;
        # rather than refuse to resume, start the next epoch (the partial epoch is not repeated).
        if index >= self.num_samples:
            epoch, index = epoch + 1, 0
        self.epoch, self.index = epoch, index

    def copy(self) -> "ResumableOrder":
        other = ResumableOrder(self.num_samples, self.seed, self.rank, self.world_size)
        other.load_state_dict(self.state_dict())
        return other
