"""Formula attention: a kernel attention built from a `formula_grammar` program (``formula:<program>``),
out of the zoo's pieces. Ops act on tuples of feature blocks (``cat`` and ``cos`` make blocks without
copying, as Hedgehog and cosFormer do); ops that read the whole vector concatenate first."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError
from ..attention.interface import MapKind
from ..attention.numerics import PrecisionPolicy
from ..attention.opcount import OpCounts, matmul_ops, softmax_ops
from ..attention.registry import register_attention, register_parametric_attention
from .focused import depthwise_grid_conv, grid_conv_counts
from .formula_grammar import (
    HAND_DESIGNED,
    OPS,
    PREFIX,
    Cat,
    Formula as Formula,
    FormulaSyntaxError as FormulaSyntaxError,
    InvalidFormula as InvalidFormula,
    Op,
    Step,
    check_formula,
    parse_formula,
)
from .formula_search import crossover as crossover, mutate as mutate, random_formula as random_formula
from .kernels import (
    HedgehogFeatures,
    KernelAttention,
    add_scalar,
    linear_readout,
    linear_state,
    scaled_for_kernel,
)
from .window import WindowAttention, WindowLinearAttention

Blocks = tuple[torch.Tensor, ...]
EPS = 1e-6
#: No feature may exceed about e^EXP_CAP, so fp32 cannot overflow: exp's input is capped at EXP_CAP / D, D the
#: power the ops after it raise its output to, and a power's (pow, square) input magnitude at e^(EXP_CAP / D), D
#: the power it and the ops after it raise that input to (`_degree`).
EXP_CAP = 30.0
#: The program of the plain name ``formula`` (no program given): Hedgehog's.
DEFAULT_PROGRAM = HAND_DESIGNED["hedgehog"][len(PREFIX) :]


def _elementwise(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Blocks, int], Blocks]:
    return lambda blocks, head_dim: tuple(fn(b) for b in blocks)


def _joined(blocks: Blocks) -> torch.Tensor:
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)


def _whole(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Blocks, int], Blocks]:
    return lambda blocks, head_dim: (fn(_joined(blocks)),)


def _focus(x: torch.Tensor, p: float) -> torch.Tensor:
    # focused linear attention's focusing function (FocusedLinearAttention.focus after its scale)
    norm = x.norm(dim=-1, keepdim=True)
    powered = (x / x.amax(dim=-1, keepdim=True)).pow(p)  # x / max first: bounded by 1, no overflow
    return powered / powered.norm(dim=-1, keepdim=True) * norm


def _capped(x: torch.Tensor, bound: float) -> torch.Tensor:
    """x with its magnitude capped at ``bound``, sign kept. Without a gradient to carry, a clamp: one pass (the
    form below made a `sum(neg.relu.square)` layer about 50 % slower where search.speed times it, without one).
    With one, x * keep + the cap: where |x| <= bound, x and its gradient pass bit for bit. A clamp, where or
    masked_fill lays the gradient out anew in its backward, and the ops before it then round theirs differently
    in the last bits."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return x.clamp(-bound, bound)
    with torch.no_grad():
        keep = x.abs() <= bound
        cap = torch.where(keep, 0.0, x.clamp(-bound, bound))
    return x * keep + cap


def _cos(blocks: Blocks, head_dim: int) -> Blocks:
    # cosFormer's reweighting: [phi cos t_i, phi sin t_i], t_i = pi/2 i / N (CosFormerAttention)
    N = blocks[0].shape[-2]
    theta = (math.pi / 2) * torch.arange(N, device=blocks[0].device, dtype=blocks[0].dtype) / N
    cos, sin = theta.cos()[:, None], theta.sin()[:, None]
    return tuple(b * cos for b in blocks) + tuple(b * sin for b in blocks)


#: Parameter-free ops by name: (blocks, head dim) -> blocks; ``pow``/``focus`` take their power first, ``exp``
#: its input cap, ``pow``/``square`` their input's largest magnitude (`_capped`).
FIXED_OPS: dict[str, Callable[..., Callable[[Blocks, int], Blocks]]] = {
    "relu": lambda: _elementwise(lambda x: add_scalar(F.relu(x), EPS)),
    "elu1": lambda: _elementwise(lambda x: add_scalar(F.elu(x), 1.0 + EPS)),
    "exp": lambda cap: _elementwise(lambda x: add_scalar(x.clamp(max=cap).exp(), EPS)),
    "softplus": lambda: _elementwise(lambda x: add_scalar(F.softplus(x), EPS)),
    "square": lambda bound: _elementwise(lambda x: add_scalar(_capped(x, bound).square(), EPS)),
    "softmax": lambda: _whole(lambda x: add_scalar(x.softmax(dim=-1), EPS)),
    "neg": lambda: _elementwise(torch.neg),
    "scale": lambda: lambda blocks, d: tuple(scaled_for_kernel(b, d) for b in blocks),
    "l2": lambda: _whole(lambda x: x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)),
    "pow": lambda p, bound: _elementwise(lambda x: x.sign() * _capped(x.abs(), bound).pow(p)),
    "focus": lambda p: _whole(lambda x: _focus(x, p)),
    "cos": lambda: _cos,
}


class Projection(HedgehogFeatures):
    """``proj``: x W + b per head, W (H, d_in, m) starting as the identity (Hedgehog's map without the softmax)."""

    def forward(self, blocks: Blocks, head_dim: int) -> Blocks:
        x = _joined(blocks)
        return (x @ self.weight.to(x.dtype) + self.bias.to(x.dtype)[:, None, :],)


class LearnedScale(nn.Module):
    """``lscale``: x / softplus(s), s (H, 1, m) starting at 0 (focused linear's per-channel scale)."""

    def __init__(self, num_heads: int, width: int, device=None, dtype=None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(num_heads, 1, width, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.scale.zero_()

    def forward(self, blocks: Blocks, head_dim: int) -> Blocks:
        x = _joined(blocks)
        return (x / F.softplus(self.scale.to(x.dtype)),)


#: Learned ops by name: (op, heads, input width, device/dtype) -> module (separate ones for q and k).
LEARNED_OPS: dict[str, Callable[..., nn.Module]] = {
    "proj": lambda op, heads, width, **dd: Projection(
        heads, width, width if op.arg is None else int(op.arg), **dd
    ),
    "lscale": lambda op, heads, width, **dd: LearnedScale(heads, width, **dd),
}


#: Operations of each op on the N x w features of one (batch, head), by name: (N, w, arg) -> counts, with the
#: conventions of `attnxfer.models.attention.opcount` (the + eps of positive ops is an addition).
STEP_COUNTS: dict[str, Callable[[int, int, float | None], OpCounts]] = {
    "relu": lambda n, w, a: OpCounts(add=n * w, other=n * w),
    "elu1": lambda n, w, a: OpCounts(add=n * w, other=n * w),
    "exp": lambda n, w, a: OpCounts(add=n * w, other=2 * n * w),  # clamp, exp
    "softplus": lambda n, w, a: OpCounts(add=n * w, other=n * w),
    "square": lambda n, w, a: OpCounts(mul=n * w, add=n * w, other=n * w),  # the cap
    "softmax": lambda n, w, a: softmax_ops(n, w) + OpCounts(add=n * w),
    "neg": lambda n, w, a: OpCounts(),  # a sign flip, folded into the next op (as Hedgehog's count has it)
    "scale": lambda n, w, a: OpCounts(mul=n * w),
    "l2": lambda n, w, a: OpCounts(mul=2 * n * w, add=n * (w - 1), other=n),  # squares, sum, sqrt, divide
    "pow": lambda n, w, a: OpCounts(other=3 * n * w),  # the cap, |x|^p, sign
    # as focused linear's map without its relu and scale: |x| (N w mul, N (w - 1) add, N sqrt), / max
    # (N (w - 1) comparisons, N w div), ^p (other), renormalised (|.| again, N w div, N w mul)
    "focus": lambda n, w, a: (
        OpCounts(mul=3 * n * w, other=n * w + n * (w - 1)) + 2 * OpCounts(mul=n * w, add=n * (w - 1), other=n)
    ),
    "cos": lambda n, w, a: OpCounts(mul=2 * n * w, other=2 * n),  # x cos t, x sin t; the angles' cos, sin
    "proj": lambda n, w, a: (
        matmul_ops(n, w, w if a is None else int(a)) + OpCounts(add=n * (w if a is None else int(a)))
    ),
    "lscale": lambda n, w, a: OpCounts(mul=n * w),  # / softplus(s), s per channel (not per token)
}


def chain_counts(chain: tuple[Step, ...], num_tokens: int, width: int, head_dim: int) -> tuple[OpCounts, int]:
    """Operations of a feature chain on one (batch, head)'s N x ``width`` input, and its output width."""
    total = OpCounts()
    for step in chain:
        if isinstance(step, Cat):
            left, lw = chain_counts(step.left, num_tokens, width, head_dim)
            right, rw = chain_counts(step.right, num_tokens, width, head_dim)
            total, width = total + left + right, lw + rw
            continue
        total = total + STEP_COUNTS[step.name](num_tokens, width, step.arg)
        width = OPS[step.name].width(width, head_dim, step.arg)
    return total, width


def _degree(chain: tuple[Step, ...], after: float = 1.0) -> float:
    """The power ``chain``, then what follows it (``after``), raises a large input to, up to the first op that
    bounds it (softmax, l2, or a later exp's own cap): ``pow(p)`` multiplies by p, ``square`` by 2, the rest
    are linear at most (focus keeps the norm); a ``cat`` takes its larger branch."""
    power = 1.0
    for i, step in enumerate(chain):
        if isinstance(step, Cat):
            rest = _degree(chain[i + 1 :], after)
            return power * max(_degree(step.left, rest), _degree(step.right, rest))
        if step.name in ("softmax", "l2", "exp"):
            return power
        power *= step.arg if step.name == "pow" else 2.0 if step.name == "square" else 1.0
    return power * after


class _Fixed(nn.Module):
    def __init__(self, op: Op, *args: float) -> None:
        super().__init__()
        self.op = op
        self.fn = FIXED_OPS[op.name](*args) if op.arg is None else FIXED_OPS[op.name](op.arg, *args)

    def forward(self, blocks: Blocks, head_dim: int) -> Blocks:
        return self.fn(blocks, head_dim)

    def extra_repr(self) -> str:
        return str(self.op)


class _Branches(nn.Module):
    def __init__(self, left: FeatureChain, right: FeatureChain) -> None:
        super().__init__()
        self.left, self.right = left, right

    def forward(self, blocks: Blocks, head_dim: int) -> Blocks:
        return self.left(blocks) + self.right(blocks)


class FeatureChain(nn.Module):
    """A grammar chain as modules: (..., H, N, d) -> feature blocks, for q or k (the window hybrid passes
    (B, windows, H, L, d); ``cos`` needs the whole sequence). ``after``: the `_degree` of what follows it."""

    def __init__(
        self,
        chain: tuple[Step, ...],
        num_heads: int,
        head_dim: int,
        width: int | None = None,
        device=None,
        dtype=None,
        after: float = 1.0,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        width = head_dim if width is None else width
        steps: list[nn.Module] = []
        for i, step in enumerate(chain):
            if isinstance(step, Cat):
                rest = _degree(chain[i + 1 :], after)
                left = FeatureChain(step.left, num_heads, head_dim, width, device, dtype, rest)
                right = FeatureChain(step.right, num_heads, head_dim, width, device, dtype, rest)
                steps.append(_Branches(left, right))
                width = left.out_dim + right.out_dim
                continue
            if step.name in LEARNED_OPS:
                steps.append(LEARNED_OPS[step.name](step, num_heads, width, device=device, dtype=dtype))
            elif step.name == "exp":
                steps.append(_Fixed(step, EXP_CAP / _degree(chain[i + 1 :], after)))
            elif step.name in ("pow", "square"):
                steps.append(_Fixed(step, math.exp(EXP_CAP / _degree(chain[i:], after))))
            else:
                steps.append(_Fixed(step))
            width = OPS[step.name].width(width, head_dim, step.arg)
        self.steps = nn.ModuleList(steps)
        self.out_dim = width

    def forward(self, x: torch.Tensor | Blocks) -> Blocks:
        blocks = (x,) if isinstance(x, torch.Tensor) else x
        for step in self.steps:
            blocks = step(blocks, self.head_dim)
        return blocks


@register_attention("formula")
class FormulaAttention(WindowLinearAttention):
    """Kernel attention from a formula program (option ``program``, default Hedgehog's): ``sum``
    programs row-stochastic (the window term under the same normaliser), ``len`` signed (/ N); a ``conv`` term
    is added outside the map, as in focused linear attention."""

    #: Programs compose exp, powers and norms freely: no program is shown safe in bf16, so all run in fp32.
    precision = PrecisionPolicy(
        fp32=("the whole core",),
        why="a program may exponentiate or raise to powers; no per-program analysis, so fp32",
    )
    rope_why = (
        "keeps its kind: the program's features take the rotated q, k, and the kind comes from the "
        "program's sign analysis, which holds for every input"
    )

    #: The window clamps to the grid; conv taps beyond it see only zero padding. Named as the program's terms.
    grid_sized = (("win", "side"), ("conv", "odd side"))

    def __init__(self, dim: int, num_heads: int = 8, *, program: str = DEFAULT_PROGRAM, **kwargs) -> None:
        formula = parse_formula(program)
        self.formula = formula
        WindowAttention.__init__(self, dim, num_heads, window_size=formula.window or 1, **kwargs)
        # not the grid: `with_attention` refuses a `grid_sized` term only where it fits no layer
        check_formula(formula, self.head_dim)
        self.win, self.conv = formula.window, formula.conv
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.program = str(formula)
        self.attention_name = formula.name
        self.map_kind = MapKind.ROW_STOCHASTIC if formula.row_stochastic else MapKind.SIGNED
        self.needs_token_layout = formula.window is not None or formula.conv is not None
        self.features_q = FeatureChain(formula.features, num_heads, self.head_dim, **dd)
        self.features_k = FeatureChain(formula.features, num_heads, self.head_dim, **dd)
        self.linear_log_weight = nn.Parameter(torch.empty(num_heads, **dd)) if formula.window else None
        self.dwc = None
        if formula.conv is not None:
            d = self.head_dim
            self.dwc = nn.Conv2d(d, d, formula.conv, padding=formula.conv // 2, groups=d, **dd)
        self.reset_new_parameters()

    @classmethod
    def own_options(cls) -> list[str]:
        return ["program"]  # the window hybrid's options are the program's business here

    def reset_new_parameters(self) -> None:
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (Projection, LearnedScale)):
                    module.reset_parameters()
            if self.linear_log_weight is not None:
                self.linear_log_weight.zero_()
            if self.dwc is not None:
                self.dwc.weight.zero_()
                self.dwc.bias.zero_()

    def feature_blocks(self, q: torch.Tensor, k: torch.Tensor) -> tuple[Blocks, Blocks]:  # window layout too
        return self.features_q(q), self.features_k(k)

    def _attend_mapped(self, q, k, v):
        if self.formula.window is not None:
            return WindowLinearAttention._attend(self, q, k, v)
        # keys first: their features reduce to (m x d) sums before the query features exist
        state = linear_state(self.features_k(k), v)
        if self.formula.row_stochastic:
            return linear_readout(self.features_q(q), state)
        out = sum(block_q @ kv for block_q, (kv, _) in zip(self.features_q(q), state, strict=True))
        return out / q.shape[-2]

    def _attend(self, q, k, v):
        out = self._attend_mapped(q, k, v)
        if self.dwc is not None:
            out = out + self.local_term(v)
        return out

    def local_term(self, v: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The ``conv`` term (``dwc`` set): as `FocusedLinearAttention.local_term`, v's own dtype."""
        return depthwise_grid_conv(v, self.dwc, *self.token_layout(v.shape[-2]), keep)

    def _map_context(self, q, k):
        if self.formula.window is not None:
            return WindowLinearAttention._map_context(self, q, k)
        return self.features(q, k)

    def _map_rows(self, context, rows):
        if self.formula.window is not None:
            return WindowLinearAttention._map_rows(self, context, rows)
        phi_q, phi_k = context
        scores = phi_q[:, :, rows] @ phi_k.transpose(-2, -1)
        return scores / (scores.sum(dim=-1, keepdim=True) if self.formula.row_stochastic else phi_k.shape[-2])

    def feature_counts(self, num_tokens: int) -> tuple[OpCounts, int]:
        """Operations of one (batch, head)'s q and k features (`STEP_COUNTS`), and the feature width."""
        one, m = chain_counts(self.formula.features, num_tokens, self.head_dim, self.head_dim)
        return 2 * one, m

    def operation_counts(self, num_tokens: int, batch: int = 1) -> OpCounts:
        """The features and the linear core (``len`` divides by N where ``sum`` divides by the normaliser:
        the same count), or the window hybrid's, plus the ``conv`` term's depthwise conv."""
        kind = WindowLinearAttention if self.formula.window is not None else KernelAttention
        total = kind.operation_counts(self, num_tokens, batch)
        if self.formula.conv is not None:
            _, grid = self.token_layout(num_tokens)
            conv = grid_conv_counts(num_tokens, grid, self.head_dim, self.formula.conv)
            total = total + conv * (batch * self.num_heads)
        return total

    def extra_repr(self) -> str:
        layout = ""
        if self.num_prefix_tokens is not None:
            layout = f", num_prefix_tokens={self.num_prefix_tokens}, grid_size={self.grid_size}"
        return (
            f"program={self.program!r}, map_kind={self.map_kind.value!r}, num_heads={self.num_heads}{layout}"
        )


@functools.cache
def _formula_class(program: str) -> type[FormulaAttention]:
    formula = parse_formula(program)
    map_kind = MapKind.ROW_STOCHASTIC if formula.row_stochastic else MapKind.SIGNED

    def __init__(self, dim: int, num_heads: int = 8, *, program: str = program, **kwargs) -> None:
        if str(parse_formula(program)) != str(formula):
            raise InputError(f"{formula.name} was given program={program!r}: one program per attention name")
        FormulaAttention.__init__(self, dim, num_heads, program=program, **kwargs)

    return type(
        "FormulaAttention",
        (FormulaAttention,),
        {
            "__init__": __init__,
            "__module__": __name__,
            "__qualname__": f"FormulaAttention[{formula}]",
            "attention_name": formula.name,
            "map_kind": map_kind,
        },
    )


def formula_attention_class(name: str) -> type[FormulaAttention]:
    """The attention class of ``formula:<program>`` (one class per canonical program)."""
    return _formula_class(str(parse_formula(name)))


register_parametric_attention(PREFIX.rstrip(":"), formula_attention_class)
