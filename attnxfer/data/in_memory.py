"""A whole dataset held as one uint8 tensor, with cheap per-sample augmentation (shift + flip)."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import InputError
from .identity import fingerprint_of
from .registry import DatasetInfo
from .seeding import key_epoch, sample_generator


class InMemoryImageDataset(Dataset):
    """Images (N, H, W) or (N, C, H, W) uint8 in memory -> normalised float (in_chans, S, S), label.
    Augmentation (a shift of the zero-padded image, a flip) is seeded by (seed, epoch, index): the same
    `SampleKey` always gives the same tensor."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        info: DatasetInfo,
        *,
        augment: bool = False,
        seed: int = 0,
        crop_padding: int = 2,
        hflip: float = 0.5,
    ):
        if images.dtype != torch.uint8 or images.ndim not in (3, 4):
            raise ValueError(
                f"images must be uint8 (N, H, W) or (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if images.ndim == 3:
            images = images.unsqueeze(1)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        src_chans = images.shape[1]
        if src_chans not in (1, info.in_chans):
            raise ValueError(f"cannot make {info.in_chans} channels from {src_chans}-channel images")
        if crop_padding < 0:  # options a run sets in data.kwargs: a refusal naming them, not a traceback
            raise InputError(
                f"{info.name}: crop_padding must be >= 0 (data.kwargs.crop_padding), got {crop_padding}"
            )
        if not 0.0 <= hflip <= 1.0:
            raise InputError(f"{info.name}: hflip is a probability, 0 to 1 (data.kwargs.hflip), got {hflip}")
        self.images = images.contiguous()
        self.labels = labels.long()
        # how `image` prepares a sample, in timm's pretrained_cfg terms (what an export declares, so that timm's
        # eval transform prepares images as the run validated them): the whole image resized, bilinear (a square
        # image's squash is timm's centre crop at crop_pct 1)
        square = images.shape[-1] == images.shape[-2]
        self.info = replace(
            info, crop_pct=1.0, crop_mode="center" if square else "squash", interpolation="bilinear"
        )
        self.augment = augment
        self.seed = seed
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.epoch = 0
        self._mean = torch.tensor(info.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(info.std, dtype=torch.float32).view(-1, 1, 1)

    def fingerprint(self) -> str:
        """Its images and labels, hashed (`attnxfer.data.identity`)."""
        return fingerprint_of([self.images.numpy().tobytes(), self.labels.numpy().tobytes()])

    def set_epoch(self, epoch: int) -> None:
        """Epoch for plain-int indices (SampleKey indices carry their own)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def _shift_flip(self, img: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        p = self.crop_padding
        if p:
            h, w = img.shape[-2:]
            top, left = torch.randint(0, 2 * p + 1, (2,), generator=generator).tolist()
            img = F.pad(img, (p, p, p, p))[..., top : top + h, left : left + w]
        if torch.rand((), generator=generator).item() < self.hflip:
            img = img.flip(-1)
        return img

    def label(self, index: int) -> int:
        return int(self.labels[int(index)])

    def image(self, index: int) -> torch.Tensor:
        """Sample ``index``'s normalised image alone (a label-free run reads only this)."""
        idx = int(index)
        img = self.images[idx]
        if self.augment:
            img = self._shift_flip(img, sample_generator(self.seed, key_epoch(index, self.epoch), idx))
        x = img.float().div_(255.0)
        size = self.info.img_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(
                x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1]
            )[0]
        if x.shape[0] != self.info.in_chans:
            x = x.expand(self.info.in_chans, -1, -1)
        return (x - self._mean) / self._std

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.image(index), self.label(index)
