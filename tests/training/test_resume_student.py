"""A run is resumed or scored with the student it trained: run.json's student spec against the one the config
builds (weights of one attention load silently into another's projections, so this is checked first)."""

from __future__ import annotations

import pytest

from attnxfer.apps.run.resume import student_as_trained
from attnxfer.checkpoints.run_dir import RunDir
from attnxfer.config import ConfigError


def test_resuming_with_another_attention_stops_and_scoring_gets_the_recorded_student(tmp_path):
    run = RunDir(tmp_path / "run")
    trained = {"architecture": "vit_tiny_patch16_224", "attention": "relu_linear", "num_classes": 0}
    run.write_record({"student": trained})
    softmax = {**trained, "attention": "softmax"}
    with pytest.raises(ConfigError, match="trained one with 'relu_linear'.*-c .*config.yaml"):
        student_as_trained(run.path, softmax, scoring=False)
    assert student_as_trained(run.path, softmax, scoring=True) == trained
    assert (
        student_as_trained(run.path, dict(trained), scoring=False) is None
    )  # the same student: resume as is
    assert student_as_trained(tmp_path / "fresh", softmax, scoring=False) is None  # no run yet
