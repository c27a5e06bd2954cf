"""Top-1 is counted in one place (`classification_sums`): the engine's evaluation and conversion's
`evaluate_top1` read it. Checked against a classifier whose logits are known, counted by hand."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import torchrun_launch

from attnxfer.train.evaluation import classification_sums, per_image_top1
from attnxfer.train.measure import evaluate_top1


class _Known(nn.Module):
    """A classifier whose logits for image ``i`` are ``logits[i]`` (the image is its index); it records the
    mode it ran in."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.num_classes, self.modes = logits, logits.shape[1], []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.logits[x[:, 0].long()]


def _by_hand(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int, float]:
    top1 = top5 = 0
    loss = 0.0
    for row, label in zip(logits.tolist(), y.tolist()):
        order = sorted(range(len(row)), key=lambda c: -row[c])
        top1 += order[0] == label
        top5 += label in order[:5]
        loss += math.log(sum(math.exp(v) for v in row)) - row[label]
    return top1, top5, loss


def test_counts_equal_a_hand_count_and_the_mode_comes_back():
    g = torch.Generator().manual_seed(2)
    logits, y = torch.randn(10, 8, generator=g), torch.randint(0, 8, (10,), generator=g)
    loader = [(torch.arange(0, 4)[:, None].float(), y[:4]), (torch.arange(4, 10)[:, None].float(), y[4:])]
    model = _Known(logits).train()
    top1, top5, loss = _by_hand(logits, y)
    sums = classification_sums(model, loader, torch.device("cpu"))
    assert sums[:2].tolist() == [top1, top5] and sums[3].item() == 10
    assert sums[2].item() == pytest.approx(loss, rel=1e-6)
    assert model.modes == [False, False] and model.training  # scored in eval mode, handed back training
    hits = per_image_top1(model, loader, torch.device("cpu"))  # the same count, image by image (McNemar)
    assert hits.tolist() == [
        max(range(8), key=lambda c: row[c]) == label for row, label in zip(logits.tolist(), y.tolist())
    ]
    assert model.modes == [False] * 4 and model.training
    assert evaluate_top1(model, loader, torch.device("cpu")) == pytest.approx(100.0 * top1 / 10)
    assert 0 < top1 < top5 < 10  # the draw tells the two counts apart


def test_without_a_head_there_is_no_top1():
    model = _Known(torch.zeros(2, 3))
    model.num_classes = 0
    assert (
        evaluate_top1(model, [(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))], torch.device("cpu"))
        is None
    )
    assert model.modes == []


@pytest.mark.slow
def test_val_hits_of_two_ranks_are_in_the_val_sets_order(tmp_path):
    """tests/dist_hits.py on two torchrun ranks: 11 images a model gets right but for 0, 5 and 7, shared 6 / 5
    by the exact val sampler (rank r: images r, r + 2, ...). The hits read image by image, as one process
    scores them: joined rank after rank they would pair other images with a run on another world size."""
    launch, env = torchrun_launch(ranks=2)
    script = str(Path(__file__).resolve().parents[1] / "dist_hits.py")
    done = subprocess.run(
        [*launch, script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "hits").read_text() == "01111010111"
