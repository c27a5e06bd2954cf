"""Operation counts of an attention core, as EcoFormer reports energy: multiplications and additions.

Each attention counts its own algorithm (`TransferableAttention.operation_counts`), from (q, k, v) heads
to the core's output heads, for one layer: the qkv and output projections are the same for every
attention and are left out. Conventions, so counts can be checked by hand:

* a matrix product (n x k) @ (k x m) costs n k m multiplications and n (k - 1) m additions;
* a division counts as a multiplication (by the reciprocal), a subtraction as an addition;
* exp, log, sqrt, max, comparisons, sign and other element-wise non-linearities count as ``other``;
* multiplying by a ±1 code is a sign flip, not a multiplication: a product with a ±1 matrix costs
  only its additions (the saving binary codes buy, EcoFormer's point);
* constant scalings that an implementation folds into a weight (softmax's 1/sqrt(d) into q) are counted
  once where they are applied.

`energy_pj` turns counts into an energy estimate with 45 nm fp32 figures (Horowitz, ISSCC 2014:
multiply 3.7 pJ, add 0.9 pJ), the figures EcoFormer's energy column uses; ``other`` is not priced.
"""

from __future__ import annotations

from dataclasses import dataclass

#: 45 nm fp32 energy per operation (Horowitz 2014), in picojoules.
MUL_PJ, ADD_PJ = 3.7, 0.9


@dataclass(frozen=True)
class OpCounts:
    """Multiplications, additions and other element-wise operations of one attention core call."""

    mul: int = 0
    add: int = 0
    other: int = 0

    def __add__(self, other: OpCounts) -> OpCounts:
        return OpCounts(self.mul + other.mul, self.add + other.add, self.other + other.other)

    def __mul__(self, factor: int) -> OpCounts:
        return OpCounts(self.mul * factor, self.add * factor, self.other * factor)

    __rmul__ = __mul__

    @property
    def energy_pj(self) -> float:
        """Estimated energy of the multiplications and additions (pJ, 45 nm fp32)."""
        return self.mul * MUL_PJ + self.add * ADD_PJ

    def to_dict(self) -> dict[str, float]:
        return {"mul": self.mul, "add": self.add, "other": self.other, "energy_pj": self.energy_pj}


def matmul_ops(n: int, k: int, m: int) -> OpCounts:
    """(n x k) @ (k x m): n k m multiplications, n (k - 1) m additions."""
    return OpCounts(mul=n * k * m, add=n * max(k - 1, 0) * m)


def sign_matmul_ops(n: int, k: int, m: int) -> OpCounts:
    """(n x k) @ (k x m) where one factor is a ±1 code matrix: additions (and sign flips) only."""
    return OpCounts(add=n * max(k - 1, 0) * m)


def softmax_ops(rows: int, cols: int) -> OpCounts:
    """Row softmax of a (rows x cols) matrix: max (cols - 1 comparisons) and exp as other, the shift and the
    row sum as additions, the normalisation as rows x cols divisions."""
    return OpCounts(
        mul=rows * cols, add=rows * cols + rows * (cols - 1), other=rows * (cols - 1) + rows * cols
    )
