"""`KeyPooling`: which of a stage's tokens each of a spatial-reduction attention's keys was made from, as one
weight matrix per axis (reduced keys × tokens), so a student row over all N tokens can be summed onto the
teacher's N_k keys. Strided blocks weigh 1 (the conv's floor remainder keeps no mass); an adaptive bin
shares an overlapping token equally (1 / count), so pooling keeps a row's total mass."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@lru_cache(maxsize=64)
def _strided(length: int, sr: int) -> torch.Tensor:
    keys = length // sr
    w = torch.zeros(keys, length, dtype=torch.float64)
    for i in range(keys):
        w[i, i * sr : (i + 1) * sr] = 1.0
    return w


def segments(length: int, count: int) -> torch.Tensor:
    """(count, length) float64, 1 where position j lies in segment r: [floor(r L / count),
    ceil((r + 1) L / count)), the bins of adaptive pooling (and Linformer's initial means)."""
    w = torch.zeros(count, length, dtype=torch.float64)
    for r in range(count):
        w[r, (r * length) // count : -((-(r + 1) * length) // count)] = 1.0
    return w


@lru_cache(maxsize=64)
def _adaptive(length: int, out: int) -> torch.Tensor:
    w = segments(length, out)
    return w / w.sum(0, keepdim=True)  # every token lies in at least one bin


@dataclass(frozen=True)
class KeyPooling:
    """The reduced keys of one call over a row-major ``grid``: ``stride`` sr blocks or ``bins`` × bins."""

    grid: tuple[int, int]
    stride: int = 0
    bins: int = 0

    def __post_init__(self) -> None:
        if (self.stride > 0) == (self.bins > 0):
            raise ValueError("KeyPooling takes one of stride (strided blocks) or bins (adaptive pooling)")
        if self.stride and min(self.grid) < self.stride:
            raise ValueError(
                f"a {self.grid} grid is smaller than the reduction's {self.stride}x{self.stride}"
            )

    @classmethod
    def strided(cls, grid: tuple[int, int] | list[int], sr: int) -> KeyPooling:
        return cls((int(grid[0]), int(grid[1])), stride=int(sr))

    @classmethod
    def adaptive(cls, grid: tuple[int, int] | list[int], bins: int) -> KeyPooling:
        return cls((int(grid[0]), int(grid[1])), bins=int(bins))

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def key_grid(self) -> tuple[int, int]:
        if self.stride:
            return (self.grid[0] // self.stride, self.grid[1] // self.stride)
        return (self.bins, self.bins)

    @property
    def num_keys(self) -> int:
        h, w = self.key_grid
        return h * w

    def weights(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        axis = (lambda n: _strided(n, self.stride)) if self.stride else (lambda n: _adaptive(n, self.bins))
        return tuple(axis(n).to(device=like.device, dtype=like.dtype) for n in self.grid)

    def _check(self, t: torch.Tensor, dim: int) -> None:
        if t.shape[dim] != self.num_tokens:
            raise ValueError(
                f"key pooling over a {self.grid[0]}x{self.grid[1]} grid takes {self.num_tokens} tokens, "
                f"got {t.shape[dim]}"
            )

    def pool(self, rows: torch.Tensor) -> torch.Tensor:
        """(..., N) map rows -> (..., N_k): each row's mass on each reduced key."""
        self._check(rows, -1)
        wh, ww = self.weights(rows)
        grid = rows.reshape(*rows.shape[:-1], *self.grid)
        return torch.einsum("...hw,ah,bw->...ab", grid, wh, ww).flatten(-2)

    def pool_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """(..., N, m) per-token features -> (..., N_k, m), summed with the same weights (a kernel's φ(k))."""
        self._check(t, -2)
        wh, ww = self.weights(t)
        grid = t.reshape(*t.shape[:-2], *self.grid, t.shape[-1])
        return torch.einsum("...hwm,ah,bw->...abm", grid, wh, ww).flatten(-3, -2)

    def log_pool(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., N) logits l -> (..., N_k) log Σ_j w_bj exp(l_j); adaptive bins shift by each row's maximum (a
        bin far below it floors at fp32's tiny)."""
        self._check(logits, -1)
        if self.stride:
            (kh, kw), s = self.key_grid, self.stride
            grid = logits.reshape(*logits.shape[:-1], *self.grid)[..., : kh * s, : kw * s]
            blocks = grid.reshape(*logits.shape[:-1], kh, s, kw, s)
            return blocks.logsumexp(dim=(-3, -1)).flatten(-2)
        top = logits.amax(-1, keepdim=True).detach()
        mass = self.pool((logits - top).exp())
        return mass.clamp_min(torch.finfo(mass.dtype).tiny).log() + top

    def key_of_token(self, device: torch.device | None = None) -> torch.Tensor:
        """(N,) the reduced key each token belongs to (its block, or its bin of largest weight; a strided
        grid's remainder its nearest block): hashing's similarity target."""
        if self.stride:
            (kh, kw), s = self.key_grid, self.stride
            rows = (torch.arange(self.grid[0], device=device) // s).clamp_max(kh - 1)
            cols = (torch.arange(self.grid[1], device=device) // s).clamp_max(kw - 1)
        else:
            wh, ww = (_adaptive(n, self.bins) for n in self.grid)
            rows, cols = wh.argmax(0).to(device), ww.argmax(0).to(device)
        return (rows[:, None] * self.key_grid[1] + cols[None, :]).flatten()

    def detach(self) -> KeyPooling:
        return self
