"""What a teacher's rotary embedding (rope) does to each zoo attention's map kind, for `attnxfer convert --help`.

A copy of `attnxfer.models.efficient.base.rope_support()` (each attention's ``rope_keeps_map_kind`` and
``rope_why``), kept here so that ``--help`` answers without importing torch; tests/test_cli_rope_help.py
holds the two equal and prints the new entries when an attention is added or changes its declaration.
"""

from __future__ import annotations

import textwrap

__all__ = ["ROPE_SUPPORT", "rope_epilog"]

#: registered zoo attention -> (rope keeps its map kind, why)
ROPE_SUPPORT: dict[str, tuple[bool, str]] = {
    "agent": (
        True,
        "keeps row_stochastic: softmax(q A^T) softmax(A k^T) of rotated q, k is a product of two row-stochastic maps for any input (agents average rotated queries)",
    ),
    "cosformer": (
        True,
        "keeps row_stochastic: relu(x) + eps times cos/sin of the raster position is non-negative for any rotated x (its 1-D locality weight sits on top of rope's 2-D positions)",
    ),
    "elu_linear": (
        True,
        "keeps row_stochastic: the features phi are non-negative for every input and rope rotates q, k before phi (rope applied after phi would lose the sign)",
    ),
    "focused_linear": (
        True,
        "keeps row_stochastic: the features phi are non-negative for every input and rope rotates q, k before phi (rope applied after phi would lose the sign)",
    ),
    "formula": (
        True,
        "keeps its kind: the program's features take the rotated q, k, and the kind comes from the program's sign analysis, which holds for every input",
    ),
    "hashing": (
        True,
        "keeps row_stochastic: the Hamming affinity of the rotated q, k's binary codes is non-negative",
    ),
    "hedgehog": (
        True,
        "keeps row_stochastic: the features phi are non-negative for every input and rope rotates q, k before phi (rope applied after phi would lose the sign)",
    ),
    "hydra": (
        True,
        "keeps none: no map (outputs only) for any q, k",
    ),
    "linformer": (
        True,
        "keeps signed: softmax(q (E k)^T) F is signed for any k; E mixes keys of different positions, so rope's relative form is not kept inside E k",
    ),
    "none": (
        True,
        "no map and no q, k to rotate: a rope teacher's block simply loses its attention branch",
    ),
    "nystrom": (
        True,
        "keeps signed: landmark softmaxes of rotated q, k and a pseudo-inverse, signed for any input",
    ),
    "performer": (
        True,
        "keeps row_stochastic and its target: positive features exp(w.x - x.x/2) estimate exp(q.k) for any q, k, and rope keeps norms, so they estimate the teacher's rope softmax",
    ),
    "relu_linear": (
        True,
        "keeps row_stochastic: the features phi are non-negative for every input and rope rotates q, k before phi (rope applied after phi would lose the sign)",
    ),
    "window": (
        True,
        "keeps row_stochastic: an exact softmax of the rotated q, k over each window's keys (the teacher's own rope logits, restricted to the window)",
    ),
    "window_linear": (
        True,
        "keeps row_stochastic: window softmax weights and gamma phi(q).phi(k) weights of the rotated q, k are non-negative, with one shared normaliser",
    ),
}


def rope_epilog(width: int = 100) -> str:
    """The convert subcommand's epilog: per zoo attention (``convert.attention``), whether applying a rope
    teacher's rotary embedding to q and k before its feature map keeps its map kind, and why."""
    name_w = max(map(len, ROPE_SUPPORT)) + 2
    lines = [
        "rope teachers (EVA-02, DINOv3, PE, Qwen3-ViT, Gemma4-ViT): each convert.attention applies the",
        "teacher's rotary embedding to q and k before its feature map. Does that keep its map kind?",
        "(no: a rope teacher is refused for that attention, with the reason below)",
    ]
    for name, (keeps, why) in ROPE_SUPPORT.items():
        head = f"  {name:<{name_w}}{'yes' if keeps else 'no':<4}"
        body = textwrap.wrap(why, width - len(head)) or [""]
        lines.append(head + body[0])
        lines.extend(" " * len(head) + more for more in body[1:])
    return "\n".join(lines) + "\n"
