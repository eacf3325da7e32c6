"""A loader over a dataset that lives whole in one tensor, on the device (digits, synthetic, latents).

A step costs two index_selects on the device and no host work: each epoch's permutation and
flips are copied to the device once, and a batch is a slice of it.
"""

from __future__ import annotations

import torch

from archirf.data.order import ResumableOrder


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # one run (the usual case): no copy


class DeviceTensorLoader:
    """Yields (x, y) batches forever from `images` (N, C, R, R) in [-1, 1] and `labels` (N,) long.

    x comes in the images' dtype from the images' device (latents.py converts, and may keep the set
    on the host)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, batch_size: int, *,
                 seed: int, rank: int = 0, world_size: int = 1, random_flip: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        self.images = images                    # (N, C, R, R) float32 on the device (latents: any float, maybe host)
        self.labels = labels                    # (N,) long, on the images' device
        self.num_samples = images.shape[0]
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.random_flip = random_flip
        self._order = ResumableOrder(self.num_samples, seed, rank, world_size)
        self._device_perm: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _permutation_on_device(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if epoch not in self._device_perm:
            indices, flips = self._order.permutation(epoch)
            # Once per epoch: the only host-to-device copy this loader makes.
            self._device_perm[epoch] = (indices.to(self.images.device), flips.to(self.images.device))
        return self._device_perm[epoch]

    def __iter__(self) -> "DeviceTensorLoader":
        return self

    def _take(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next batch's sample indices (B,) and flips (B,) or None, on the set's device."""
        runs = self._order.take(self.batch_size)
        parts = [self._permutation_on_device(epoch) for epoch, _, _ in runs]
        index = _cat([p[0][start:stop] for p, (_, start, stop) in zip(parts, runs)])       # (B,)
        flip = _cat([p[1][start:stop] for p, (_, start, stop) in zip(parts, runs)]) if self.random_flip else None
        self._device_perm = {e: v for e, v in self._device_perm.items() if e >= self._order.epoch}
        return index, flip

    @staticmethod
    def _gather(t: torch.Tensor, index: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
        x = t.index_select(0, index)                                                        # (B, C, R, R)
        return torch.where(flip[:, None, None, None], x.flip(-1), x) if flip is not None else x

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        index, flip = self._take()
        return self._gather(self.images, index, flip), self.labels.index_select(0, index)

    def state_dict(self) -> dict:
        return self._order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._order.load_state_dict(state)
        self._device_perm = {}
