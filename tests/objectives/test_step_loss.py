"""The step's loss is composed in one place (`compose_loss`), and its logged names say what they sum."""

import torch

from attnxfer.models.handover import Signal
from attnxfer.transfer import Comparison, Loss, TransferOutput, compose_loss


def _compared():
    maps = Comparison(Signal.MAPS, "map", weight=2.0, pairs=((0, 0), (1, 1)))
    logits = Comparison(Signal.LOGITS, "logit_kd", weight=0.5)
    q = Comparison(Signal.Q, "mse", weight=0.25, pairs=((0, 0),))
    ce0, ce1, kd, mse = (torch.tensor(v, dtype=torch.float64) for v in (1.5, 2.5, 0.75, 3.0))
    return [
        (maps, Loss(ce0 + ce1, {"attn_ce/0": ce0, "attn_ce/1": ce1}, {"attn_kl/0": ce0 / 2})),
        (logits, Loss(kd, {"logit_kd": kd})),
        (q, Loss(mse, {"mse_q/0": mse})),
    ]


def test_total_is_the_weighted_task_plus_each_comparison_at_its_weight_in_the_plans_order():
    task = torch.tensor(1.25, dtype=torch.float64)
    out = compose_loss(_compared(), task, task_weight=0.8)
    transfer = 2.0 * torch.tensor(4.0, dtype=torch.float64) + 0.5 * 0.75 + 0.25 * 3.0
    assert out.total.item() == (0.8 * task + transfer).item()
    assert out.terms["transfer"].item() == transfer.item() and out.terms["total"] is out.total
    assert out.terms["task"] is task  # logged unweighted, as each comparison is


def test_logged_names_say_what_they_sum():
    out = compose_loss(_compared(), torch.tensor(1.0))
    assert list(out.terms) == [
        "task",
        "attn_ce/0",
        "attn_ce/1",
        "map",
        "logit_kd",
        "mse_q/0",
        "mse_q",  # a loss that compares several signals is named with the one it compares
        "transfer",
        "total",
    ]
    assert out.terms["map"].item() == 4.0 and out.logs == {
        "attn_kl/0": torch.tensor(0.75, dtype=torch.float64)
    }


def test_without_a_task_loss_the_total_is_the_transfer_and_two_comparisons_of_one_name_both_show():
    (maps, loss), *_ = _compared()
    out = compose_loss([(maps, loss), (maps, loss)])
    assert "task" not in out.terms and out.total is out.terms["transfer"]
    assert out.terms["map"].item() == out.terms["map#2"].item() == 4.0


def _two_entries_of_each() -> list:
    """e.g. logit_kd at two temperatures, or attention CE at two weights, on the same layers."""
    (maps, _), (logits, _), _ = _compared()
    ce, ce2, kd, kd2 = (torch.tensor(v) for v in (1.0, 2.0, 3.0, 4.0))
    return [
        (maps, Loss(ce, {"attn_ce/0": ce}, {"attn_kl/0": ce / 2})),
        (logits, Loss(kd, {"logit_kd": kd})),
        (maps, Loss(ce2, {"attn_ce/0": ce2}, {"attn_kl/0": ce2 / 2})),
        (logits, Loss(kd2, {"logit_kd": kd2})),
    ]


def test_two_entries_of_one_loss_on_the_same_layers_each_log_their_own_parts():
    # the second marks its parts ``#2``
    out = compose_loss(_two_entries_of_each())
    logged = {k: v.item() for k, v in {**out.terms, **out.logs}.items()}
    assert logged["attn_ce/0"] == 1.0 and logged["attn_ce#2/0"] == 2.0
    assert logged["attn_kl/0"] == 0.5 and logged["attn_kl#2/0"] == 1.0
    assert logged["map"] == 1.0 and logged["map#2"] == 2.0
    assert logged["logit_kd"] == 3.0 and logged["logit_kd#2"] == 4.0


def test_a_pairs_output_names_the_parts_of_two_entries_of_one_loss_as_the_run_logs_them():
    """`TeacherStudent(...)(x).terms` from Python: the second entry's parts beside the first's, not over them."""
    out = TransferOutput(torch.zeros(1, 2), _two_entries_of_each())
    assert {k: v.item() for k, v in out.terms.items()} == {
        "attn_ce/0": 1.0,
        "logit_kd": 3.0,
        "attn_ce#2/0": 2.0,
        "logit_kd#2": 4.0,
    }
    assert {k: v.item() for k, v in out.logs.items()} == {"attn_kl/0": 0.5, "attn_kl#2/0": 1.0}
    assert out.loss.item() == compose_loss(_two_entries_of_each()).total.item()
