"""What the layer-decay docstrings say is what the groups hold, for both poolings: with
class-token pooling timm 1.0.31 puts the final ``norm`` in the last block's group; with average pooling
``fc_norm`` is at the head's lr."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from helpers import tiny_vit

from attnxfer.apps.run.parts import student_attention
from attnxfer.train.optim import student_param_groups

DEPTH, DECAY = 4, 0.5


def _powers(global_pool: str, rule: str) -> dict[str, int]:
    """Parameter name prefix -> the power of the decay its lr scale is (one value per prefix)."""
    with torch.device("meta"):
        vit = timm.create_model("vit_tiny_patch16_224", depth=DEPTH, num_classes=10, global_pool=global_pool)
    names = {id(p): n for n, p in vit.named_parameters()}
    out: dict[str, set[int]] = {}
    for group in student_param_groups(vit, 0.05, DECAY, layer_decay_rule=rule):
        for p in group["params"]:
            name = names[id(p)]
            prefix = ".".join(name.split(".")[:2]) if name.startswith("blocks.") else name.split(".")[0]
            out.setdefault(prefix, set()).add(round(math.log(group["lr_scale"]) / math.log(DECAY)))
    assert all(len(v) == 1 for v in out.values()), out
    return {k: v.pop() for k, v in out.items()}


# The written rule: block i gets decay^(D-i) (timm) or decay^(D-1-i) (attention_transfer); the stem one
# power above block 0; the head (and fc_norm) 1.0; the final norm the last block's power.
@pytest.mark.parametrize("rule,shift", [("timm", 0), ("attention_transfer", 1)])
@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_layer_decay_groups_match_the_docstring(global_pool, rule, shift):
    powers = _powers(global_pool, rule)
    expected = {f"blocks.{i}": DEPTH - i - shift for i in range(DEPTH)}
    expected |= {
        "cls_token": DEPTH + 1 - shift,
        "pos_embed": DEPTH + 1 - shift,
        "patch_embed": DEPTH + 1 - shift,
    }
    expected["head"] = 0
    if global_pool == "token":  # final norm, grouped with the last block
        expected["norm"] = expected[f"blocks.{DEPTH - 1}"]
        assert expected["norm"] == 1 - shift
    else:  # the norm is an Identity; fc_norm after the pooling trains at the head's lr
        expected["fc_norm"] = 0
    assert powers == expected


@pytest.mark.parametrize("weight_decay,layer_decay", [(-0.05, None), (0.05, -0.75), (0.05, 0.0), (0.05, 1.5)])
def test_a_decay_that_would_climb_the_loss_or_do_nothing_is_refused(weight_decay, layer_decay):
    with pytest.raises(ValueError, match=r"weight_decay must be >= 0 and layer_decay in \(0, 1\]"):
        student_param_groups(tiny_vit(depth=2), weight_decay=weight_decay, layer_decay=layer_decay)


@pytest.mark.parametrize("layer_decay", [None, 0.75])
def test_a_per_head_bias_is_not_decayed_with_or_without_layer_decay(layer_decay):
    student = student_attention(tiny_vit(depth=2), "hedgehog", {})
    names = {id(p): n for n, p in student.named_parameters()}
    decay = {
        names[id(p)]: group["weight_decay"]
        for group in student_param_groups(student, 0.05, layer_decay)
        for p in group["params"]
    }
    bias = "blocks.0.attn.feature_map_q.bias"
    assert student.get_parameter(bias).ndim == 2  # one bias row per head: not caught by timm's 1-d rule
    assert decay[bias] == 0.0
    assert decay["blocks.0.attn.feature_map_q.weight"] == 0.05
