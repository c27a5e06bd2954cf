"""NaFlexViT batches whose samples have different numbers of patches, through `TeacherStudent` training.

The oracle is each sample run alone, unpadded, through timm's own modules (fused attention off, maps
recorded on ``attn_drop``): the padded batch's per-layer distillation CE must be the mean over every
sample's real query rows of −Σ_j P_t log P_s from those maps (padded keys get no weight in either map,
padded query rows count for nothing), with the same gradients; copy must give each sample the logits it
gets alone; a few optimiser steps in both modes train on the padded batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
from families.cases import TINY
from families.oracles import oracle_maps

from attnxfer.transfer import TeacherStudent
from attnxfer.transfer.losses import padding_from_mask

N = 16  # 4 x 4 patches of 8 px; sample 0 keeps all, sample 1 three rows (12), sample 2 two rows (8)
REAL = (16, 12, 8)


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    valid = torch.zeros(len(REAL), N, dtype=torch.bool)
    for b, n in enumerate(REAL):
        valid[b, :n] = True
    coord = torch.stack([rows.flatten(), cols.flatten()], -1).expand(len(REAL), N, 2).clone()
    coord[~valid] = 0  # as timm's NaFlex collator pads: each sample's grid is its own real patches'
    return dict(
        patches=torch.randn(len(REAL), N, 8 * 8 * 3, generator=g), patch_coord=coord, patch_valid=valid
    )


def _alone(batch: dict[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    """Sample ``b`` by itself, its padding cut off (every patch valid)."""
    keep = batch["patch_valid"][b]
    return dict(
        patches=batch["patches"][b : b + 1, keep],
        patch_coord=batch["patch_coord"][b : b + 1, keep],
        patch_valid=torch.ones(1, int(keep.sum()), dtype=torch.bool),
    )


def _models():
    return TINY["naflex"].build(seed=0), TINY["naflex"].build(seed=1).train()


# attention_lse: the padded layers hand out no lse (their logits are masked) and take the padded path; they
# stopped the step with "return_lse takes no attention mask"
@pytest.mark.parametrize("ce_path", ["rows", "attention_lse"])
def test_padded_distill_ce_and_gradients_equal_each_sample_alone(batch, ce_path):
    teacher, student = _models()
    oracle_t, oracle_s = copy.deepcopy(teacher), copy.deepcopy(student)  # timm's own classes, unswapped
    pair = TeacherStudent(teacher, student, mode="distill", ce_path=ce_path).train()
    out = pair(batch)
    # the oracle: every sample alone through timm's modules, CE summed over its real rows
    sums, rows = None, 0
    for b in range(len(REAL)):
        p_t = oracle_maps(oracle_t, _alone(batch, b))
        p_s = oracle_maps(oracle_s, _alone(batch, b), grad=True)
        ces = [-(t.double() * s.double().log()).sum(-1).sum() for t, s in zip(p_t, p_s)]
        sums = ces if sums is None else [a + c for a, c in zip(sums, ces)]
        rows += p_s[0].shape[1] * p_s[0].shape[2]  # heads x (prefix + real patches)
    want = [s / rows for s in sums]
    assert len(want) == 2
    for i, w in enumerate(want):
        torch.testing.assert_close(out.terms[f"attn_ce/{i}"].double(), w, rtol=1e-5, atol=1e-6)
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    got = torch.autograd.grad(
        sum(out.terms.values()), [student.get_parameter(n) for n in names], allow_unused=True
    )
    exp = torch.autograd.grad(sum(want), [oracle_s.get_parameter(n) for n in names], allow_unused=True)
    touched = 0
    for n, g, w in zip(names, got, exp):
        if w is None or w.abs().max() == 0:
            continue
        touched += 1
        scale = w.abs().max().item()
        torch.testing.assert_close(
            g.double(), w.double(), rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=n: f"{n}: {m}"
        )
    assert touched >= 4
    # the padding matters: the same batch with the padded tokens counted gives another CE
    unmasked = {**batch, "patch_valid": torch.ones_like(batch["patch_valid"])}
    assert (
        TeacherStudent(teacher, student, mode="distill")(unmasked).terms["attn_ce/0"] - out.terms["attn_ce/0"]
    ).abs() > 1e-3


def test_forced_attention_lse_runs_on_a_batch_whose_mask_pads_nothing(batch, monkeypatch):
    """A batch of whole images still carries timm's attention mask, which hides no logit: the layers hand out
    their lse as unmasked ones do, so a forced attention_lse path really runs (it was replaced by sdpa unsaid)
    and gives the CE, logits and gradients of the rows path."""
    import attnxfer.transfer.map_losses as map_losses

    taken, real = [], map_losses.attention_distillation_loss

    def spy(*args, path=None, lse_s=None, **kw):
        taken.append((str(path), lse_s is not None))
        return real(*args, path=path, lse_s=lse_s, **kw)

    monkeypatch.setattr(map_losses, "attention_distillation_loss", spy)
    whole = {k: torch.cat([v, v]) for k, v in _alone(batch, 0).items()}  # two samples, nothing padded
    teacher, student = _models()
    out = {
        p: TeacherStudent(teacher, student, mode="distill", ce_path=p).train()(whole)
        for p in ("attention_lse", "rows")
    }
    assert taken[:2] == [("attention_lse", True)] * 2
    torch.testing.assert_close(out["attention_lse"].logits, out["rows"].logits, rtol=1e-5, atol=1e-6)
    params = [p for p in student.parameters() if p.requires_grad]
    grads = {}
    for p, res in out.items():
        torch.testing.assert_close(
            res.terms["attn_ce/0"], out["rows"].terms["attn_ce/0"], rtol=1e-5, atol=1e-6
        )
        grads[p] = torch.autograd.grad(sum(res.terms.values()), params, allow_unused=True)
    for a, b in zip(grads["attention_lse"], grads["rows"]):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_padded_copy_gives_each_sample_its_own_logits_and_both_modes_train(batch):
    teacher, student = _models()
    copy_pair = TeacherStudent(teacher, student, mode="copy").train()
    with torch.no_grad():
        padded = copy_pair(batch).logits
        for b in range(len(REAL)):
            alone = copy_pair(_alone(batch, b)).logits
            torch.testing.assert_close(padded[b : b + 1], alone, rtol=1e-5, atol=1e-5)
    for mode in ("copy", "distill"):
        teacher, student = _models()
        pair = TeacherStudent(teacher, student, mode=mode).train()
        opt = torch.optim.SGD(pair.parameters(), lr=0.05)
        labels = torch.tensor([0, 1, 2])
        before = {n: p.detach().clone() for n, p in student.named_parameters()}
        for _ in range(2):
            out = pair(batch)
            loss = torch.nn.functional.cross_entropy(out.logits, labels)
            if out.loss is not None:
                loss = loss + out.loss
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert any(not torch.equal(p, before[n]) for n, p in student.named_parameters())


def test_padding_from_mask_reads_timms_masks_and_refuses_others():
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    symmetric = torch.zeros(2, 1, 4, 4).masked_fill(
        ~(valid[:, None, :, None] & valid[:, None, None, :]), torch.finfo(torch.float32).min
    )
    assert torch.equal(padding_from_mask(symmetric, 4), valid)
    key_only = torch.zeros(2, 1, 1, 4).masked_fill(~valid[:, None, None, :], torch.finfo(torch.float32).min)
    assert torch.equal(padding_from_mask(key_only, 4), valid)
    assert padding_from_mask(torch.zeros(2, 1, 4, 4), 4) is None  # nothing padded: the plain path
    causal = torch.ones(4, 4, dtype=torch.bool).tril().expand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="not a padding mask"):
        padding_from_mask(causal, 4)
