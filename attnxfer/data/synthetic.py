"""Synthetic images with learnable labels, of any shape, for tests and smoke runs: a sample is its class's
smooth random prototype plus pixel noise, all a function of (seed, split, index), made on access."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import InputError
from .identity import fingerprint_of
from .registry import DatasetInfo, built_info, register_dataset
from .seeding import sample_generator

SYNTHETIC_INFO = DatasetInfo(
    name="synthetic", num_classes=10, class_names=None, mean=(0.5,), std=(0.25,), in_chans=3, img_size=32
)

_PROTOTYPE_GRID = 4  # prototypes are a 4x4 random grid, upsampled: smooth, class-specific blobs
_PROTOTYPE_AMP = 0.2  # pixel = 0.5 + amp * prototype + noise, clamped to [0, 1]
_SPLIT_IDS = {"train": 0, "val": 1}


class SyntheticImages(Dataset):
    """``length`` samples (x, label): x is (in_chans, img_size, img_size) normalised by mean/std."""

    def __init__(self, info: DatasetInfo, *, split: str, length: int, seed: int, noise: float):
        if info.num_classes is None or info.num_classes < 1 or length < 0 or noise < 0:
            raise InputError(
                f"synthetic: need num_classes >= 1, length >= 0, noise >= 0; got "
                f"{info.num_classes}, {length}, {noise}"
            )
        self.info = info
        self.length = length
        self.seed = seed
        self.noise = noise
        self._split_id = _SPLIT_IDS[split]
        g = sample_generator(seed, -1, -1)  # prototypes: shared by both splits
        grid = torch.randn(info.num_classes, info.in_chans, _PROTOTYPE_GRID, _PROTOTYPE_GRID, generator=g)
        protos = F.interpolate(
            grid, size=(info.img_size, info.img_size), mode="bilinear", align_corners=False
        )
        self.prototypes = protos / protos.flatten(1).std(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)
        self._mean = torch.tensor(info.mean).view(-1, 1, 1)
        self._std = torch.tensor(info.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return self.length

    def fingerprint(self) -> str:
        """What defines its samples (`attnxfer.data.identity`): they are generated from these alone."""
        i = self.info
        return fingerprint_of(
            [self.seed, self.length, self.noise, self._split_id, i.num_classes, i.in_chans, i.img_size]
        )

    def image(self, index: int) -> torch.Tensor:
        """Sample ``index``'s image alone (a label-free run reads only this)."""
        idx = int(index)
        if not 0 <= idx < self.length:
            raise IndexError(f"index {idx} out of range for {self.length} samples")
        g = sample_generator(self.seed, self._split_id, idx)
        noise = torch.randn(self.prototypes.shape[1:], generator=g) * self.noise
        pixels = (0.5 + _PROTOTYPE_AMP * self.prototypes[idx % self.info.num_classes] + noise).clamp_(
            0.0, 1.0
        )
        return (pixels - self._mean) / self._std

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.image(index), int(index) % self.info.num_classes


@register_dataset("synthetic", info=SYNTHETIC_INFO, reads_root=False)
def build_synthetic(
    split: str,
    *,
    root: str | None = None,
    img_size: int | None = None,
    in_chans: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
    num_classes: int = 10,
    length: int = 512,
    noise: float = 0.1,
) -> SyntheticImages:
    """Synthetic split (``root`` is ignored): ``length`` samples of ``num_classes`` balanced classes."""
    info = built_info("synthetic", SYNTHETIC_INFO, img_size, in_chans, mean, std, num_classes=num_classes)
    return SyntheticImages(info, split=split, length=length, seed=seed, noise=noise)
