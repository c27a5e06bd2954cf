"""Operation counts of an attention core (q, k, v heads to output heads; projections left out), as EcoFormer
reports energy. Conventions: (n x k) @ (k x m) costs n k m multiplications and n (k - 1) m additions; a
division is a multiplication, a subtraction an addition; exp, log, max and other non-linearities are
``other``; a product with a ±1 code costs only its additions (EcoFormer's point); `energy_pj` prices
multiply 3.7 pJ and add 0.9 pJ (45 nm fp32, Horowitz, ISSCC 2014)."""

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
        return self.mul * MUL_PJ + self.add * ADD_PJ

    def to_dict(self) -> dict[str, float]:
        return {"mul": self.mul, "add": self.add, "other": self.other, "energy_pj": self.energy_pj}


def matmul_ops(n: int, k: int, m: int) -> OpCounts:
    return OpCounts(mul=n * k * m, add=n * max(k - 1, 0) * m)


def sign_matmul_ops(n: int, k: int, m: int) -> OpCounts:
    """(n x k) @ (k x m) where one factor is a ±1 code matrix: additions (and sign flips) only."""
    return OpCounts(add=n * max(k - 1, 0) * m)


def softmax_ops(rows: int, cols: int) -> OpCounts:
    """Row softmax: max and exp as other, the shift and row sum as additions, rows x cols divisions."""
    return OpCounts(
        mul=rows * cols, add=rows * cols + rows * (cols - 1), other=rows * (cols - 1) + rows * cols
    )
