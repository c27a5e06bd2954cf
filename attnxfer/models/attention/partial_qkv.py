"""`PartialQKV`: a fused projection whose q/k/v row blocks train or stay frozen independently, with timm's
``state_dict`` names (copied layers keep their borrowed projections as buffers)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ...errors import InputError

#: The three projections of a fused qkv, in timm's row order.
QKV = ("q", "k", "v")


class PartialQKV(nn.Module):
    """Frozen blocks are buffers (no gradient, weight decay or optimizer state), while ``state_dict`` still
    reads and writes timm's ``qkv.weight`` / ``qkv.bias``, so checkpoints stay interchangeable with timm's."""

    def __init__(self, linear: nn.Linear, frozen: Iterable[str], chunks: Sequence[str] = QKV):
        super().__init__()
        frozen = set(frozen)
        self.chunks = tuple(chunks)  # the row blocks, in order (PVTv2/Twins' fused ``kv``: ("k", "v"))
        unknown = frozen - set(self.chunks)
        if unknown:
            raise ValueError(
                f"PartialQKV: unknown chunks {sorted(unknown)}; use a subset of {', '.join(map(repr, self.chunks))}"
            )
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.frozen = tuple(c for c in self.chunks if c in frozen)
        self.has_bias = linear.bias is not None
        rows = linear.out_features // len(self.chunks)
        for i, name in enumerate(self.chunks):
            w = linear.weight.detach()[i * rows : (i + 1) * rows].clone()
            b = linear.bias.detach()[i * rows : (i + 1) * rows].clone() if self.has_bias else None
            if name in frozen:
                self.register_buffer(f"{name}_weight", w)
                self.register_buffer(f"{name}_bias", b)
            else:
                self.register_parameter(f"{name}_weight", nn.Parameter(w))
                self.register_parameter(f"{name}_bias", nn.Parameter(b) if b is not None else None)

    def as_linear(self) -> nn.Linear:
        """The whole projection as one trainable ``nn.Linear`` again."""
        w = self.weight
        linear = nn.Linear(self.in_features, self.out_features, self.has_bias, w.device, w.dtype)
        linear.load_state_dict(self.state_dict())
        return linear

    def chunk(self, name: str):
        return getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias")

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.chunk(c)[0] for c in self.chunks], 0)

    @property
    def bias(self) -> torch.Tensor | None:
        return torch.cat([self.chunk(c)[1] for c in self.chunks], 0) if self.has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    # timm-compatible serialisation: one `weight` (and `bias`) like nn.Linear.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        w, b = self.weight, self.bias
        destination[prefix + "weight"] = w if keep_vars else w.detach()
        if b is not None:
            destination[prefix + "bias"] = b if keep_vars else b.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        rows = self.out_features // len(self.chunks)
        for suffix in ("weight", "bias") if self.has_bias else ("weight",):
            key = prefix + suffix
            if key not in state_dict:
                missing_keys.append(key)
                continue
            full = state_dict[key]
            if full.shape[0] != self.out_features:
                error_msgs.append(f"size mismatch for {key}: {tuple(full.shape)} vs {self.out_features} rows")
                continue
            with torch.no_grad():
                for i, name in enumerate(self.chunks):
                    getattr(self, f"{name}_{suffix}").copy_(full[i * rows : (i + 1) * rows])
        rests = (key[len(prefix) :] for key in state_dict if key.startswith(prefix))
        unexpected_keys.extend(prefix + r for r in rests if r not in ("weight", "bias") and "." not in r)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, frozen={self.frozen}"


#: the optimizer step hook `retire` registers, once per process
_hook = None


def retire(parameters: Iterable[nn.Parameter]) -> None:
    """Mark parameters a freeze or thaw replaced with new objects. An optimizer built before would step
    these (their gradients stay None, so it skips them) while the model's own never train: its first step
    is refused instead (a hook on every optimizer's step, registered once)."""
    global _hook
    for p in parameters:
        p.attnxfer_replaced = True
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_refuse_replaced)


def _refuse_replaced(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    held = sum(getattr(p, "attnxfer_replaced", False) for g in optimizer.param_groups for p in g["params"])
    if held:
        raise InputError(
            f"{type(optimizer).__name__} holds {held} parameter(s) that attnxfer replaced when it froze or thawed "
            "a layer's q/k/v projections (TeacherStudent(mode='copy'), a copy plan, a conversion's stage 1): "
            "they no longer belong to the model, so its projections would not train. Build the optimizer "
            "after the TeacherStudent, from pair.student's parameters (student_param_groups(pair, ...))"
        )


def fused_rows(
    linear: nn.Module, name: str, chunks: Sequence[str] = QKV
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of row block ``name`` of a fused ``linear`` whose blocks are ``chunks``."""
    if isinstance(linear, PartialQKV):
        return linear.chunk(name)
    rows = linear.out_features // len(chunks)
    i = tuple(chunks).index(name)
    w = linear.weight[i * rows : (i + 1) * rows]
    b = linear.bias[i * rows : (i + 1) * rows] if linear.bias is not None else None
    return w, b


def freeze_fused(
    attn: nn.Module, attr: str, frozen: set[str], chunks: Sequence[str] = QKV
) -> set[str] | None:
    """Make ``attn.<attr>`` a `PartialQKV` with ``frozen`` (and the already frozen) blocks; returns every
    frozen block, or None when all were frozen before (the module is then left as it is)."""
    linear = getattr(attn, attr)
    retire(linear.parameters())
    if isinstance(linear, PartialQKV):
        if frozen <= set(linear.frozen):
            return None
        frozen = frozen | set(linear.frozen)
        linear = linear.as_linear()
    setattr(attn, attr, PartialQKV(linear, frozen, chunks=chunks))
    return frozen


def _to_buffer(module: nn.Module, *names: str) -> None:
    """Parameters ``names`` become buffers of the same names: no gradient, same ``state_dict`` keys."""
    for name in names:
        p = module._parameters.get(name)
        if p is not None:
            retire([p])
            del module._parameters[name]
            module.register_buffer(name, p.detach().clone())
            module.__dict__.setdefault("_were_parameters", []).append(name)  # for `thaw_projections`


def freeze_chunks(attn: nn.Module, chunks: Iterable[str]) -> None:
    """Freeze the q/k/v projections ``chunks`` of either layout (copied layers do not use them)."""
    chunks = set(chunks)
    if not chunks:
        return
    if getattr(attn, "qkv", None) is not None:
        chunks = freeze_fused(attn, "qkv", chunks)
        if chunks is None:
            return
        for c in chunks:
            _to_buffer(attn, f"{c}_bias")
    else:
        for c in chunks:
            _to_buffer(getattr(attn, f"{c}_proj"), "weight", "bias")
    for c in chunks & {"q", "k"}:
        norm = getattr(attn, f"{c}_norm", None)
        if norm is not None:
            norm.requires_grad_(False)


def thaw_projections(attn: nn.Module) -> None:
    """Undo ``freeze_projections``: a student copied into before trains all of ``attn`` again."""
    for m in list(attn.modules()):
        for name, child in list(m.named_children()):
            if isinstance(child, PartialQKV):
                retire(child.parameters())
                setattr(m, name, child.as_linear())
        for name in m.__dict__.pop("_were_parameters", ()):
            m.register_parameter(name, nn.Parameter(m._buffers.pop(name)))
    attn.requires_grad_(True)  # the q/k norms (and CaiT's proj_l) frozen with them
