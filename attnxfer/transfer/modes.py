"""Transfer modes as data (`MODES`): what each config word borrows from the teacher and distils, so the plan
and `TeacherStudent` read a mode's fields and never its name."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError
from ..models.handover import Chunks, Signal


class PlanError(InputError):
    """A teacher/student/config combination that cannot be transferred; the message says what to change."""


@dataclass(frozen=True)
class TransferMode:
    """What a mode moves: ``borrow``, the q/k/v the student takes from the teacher at run time (its own are
    frozen), and ``distill``, what it learns to match (maps by its map kind's loss, or q, k, v by MSE)."""

    name: str
    borrow: Chunks = field(default_factory=Chunks)
    distill: Signal | None = None
    description: str = ""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "borrow", Chunks(self.borrow))
        except ValueError as e:
            raise ValueError(f"TransferMode {self.name!r}: borrow: {e}") from None
        distill = Signal(self.distill) if self.distill else None
        if distill is not None and not distill.chunks:
            raise ValueError(f"TransferMode {self.name!r}: distill is maps, q, k or v, got '{distill}'")
        object.__setattr__(self, "distill", distill)

    @property
    def is_copy(self) -> bool:
        return bool(self.borrow)

    @property
    def is_distill(self) -> bool:
        return self.distill is not None

    @property
    def moves_nothing(self) -> bool:
        """Plain student training: no attention signal crosses over."""
        return not self.is_copy and not self.is_distill

    @property
    def chunks(self) -> Chunks:
        """The q/k/v each transferred teacher layer hands over (and a distilled student layer captures)."""
        return self.borrow or Chunks(() if self.distill is None else (self.distill,))

    @property
    def mixes_chunks(self) -> bool:
        """Teacher and student q/k/v meet inside one layer (copy of one chunk, or MSE on one): head dims must match.
        (Borrowing q and k together needs no equal head dim: the teacher's map is applied to the student's v.)"""
        return (self.is_copy and set(self.borrow) != set(Signal.MAPS.chunks)) or (
            self.distill is not None and self.distill.is_chunk
        )

    @property
    def teacher_at_eval(self) -> bool:
        """Copied layers need the teacher at inference too; distilled students stand alone."""
        return self.is_copy


#: every transfer mode by its config word: the one place that says what each mode borrows and distils.
#: "none" moves no attention: a from-scratch baseline, an MAE fine-tune, plain feature or logit distillation,
#: or convert's stage 2 (which fine-tunes the converted student); its description says only what is true of all.
MODES: dict[str, TransferMode] = {
    mode.name: mode
    for mode in (
        TransferMode("none", description="no attention transfer"),
        TransferMode(
            "copy", borrow=Signal.MAPS, description="student uses the teacher's maps: SDPA(q_t, k_t, v_s)"
        ),
        TransferMode("copy_q", borrow=Signal.Q, description="teacher queries with student keys"),
        TransferMode("copy_k", borrow=Signal.K, description="student queries with teacher keys"),
        TransferMode("copy_v", borrow=Signal.V, description="student maps applied to the teacher's values"),
        TransferMode(
            "distill",
            distill=Signal.MAPS,
            description="student attention maps learn the teacher's, each layer by the loss of its map kind",
        ),
        TransferMode("distill_q", distill=Signal.Q, description="MSE between queries"),
        TransferMode("distill_k", distill=Signal.K, description="MSE between keys"),
        TransferMode("distill_v", distill=Signal.V, description="MSE between values"),
    )
}


def get_mode(name: str) -> TransferMode:
    if name not in MODES:
        raise PlanError(f"unknown transfer mode {name!r}; choose one of: {', '.join(MODES)}")
    return MODES[name]
