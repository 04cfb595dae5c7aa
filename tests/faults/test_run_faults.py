"""Run faults: a run killed between its final checkpoint and its end-of-run files, temp files of a
killed save, and the online weak-teacher warning."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from detkd.cli import main
from detkd.config import load_recipe
from detkd.engine.run_log import read_metrics
from detkd.engine.teacher_ap import WEAK_TEACHER_AP, warn_if_weak_teacher
from detkd.engine.trainer import Trainer
from detkd.models.builders import DetectorSpec, build_detector
from detkd.runs.distillation import check_teacher
from detkd.runs.setup import load_data


def test_killed_after_final_checkpoint_then_resumed_finishes_the_run(
    recipe_factory, tmp_path, small_synth, capsys, monkeypatch
):
    run = tmp_path / "run"
    recipe = str(recipe_factory(tmp_path, small_synth, run))

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt  # the kill lands right after last.pt was renamed into place

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_write_run_files", killed)
        assert main(["train", recipe, "--no-progress"]) == 130
    assert (run / "last.pt").is_file()
    assert not (run / "metrics.json").exists() and not (run / "curves.png").exists()
    (run / "last.pt.tmp").write_bytes(b"partial")  # and a half-written save from before the kill
    weights = (run / "last.pt").read_bytes()
    capsys.readouterr()

    assert main(["train", recipe, "--resume", "--no-progress"]) == 0
    assert "done: AP" in capsys.readouterr().out
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["last"]["epoch"] == 1 and "AP" in saved["last"] and len(saved["history"]) == 1
    assert (run / "curves.png").stat().st_size > 0
    assert [m["epoch"] for m in read_metrics(run)] == [1]
    assert not (run / "last.pt.tmp").exists()
    assert (run / "last.pt").read_bytes() == weights  # nothing retrained

    # Resuming a finished run again is harmless: the same files, no duplicate metrics line.
    assert main(["train", recipe, "--resume", "--no-progress"]) == 0
    assert json.loads((run / "metrics.json").read_text()) == saved
    assert [m["epoch"] for m in read_metrics(run)] == [1]


def test_lr_inf_is_refused_before_anything_runs(recipe_factory, tmp_path, small_synth, capsys):
    run = tmp_path / "run"
    assert main(["train", str(recipe_factory(tmp_path, small_synth, run)), "train.lr=.inf", "--no-progress"]) == 2
    assert "train.lr: Input should be a finite number" in capsys.readouterr().err
    assert not run.exists()


def test_online_path_warns_loudly_about_an_untrained_teacher(recipe_factory, tmp_path, small_synth, caplog):
    recipe = load_recipe(recipe_factory(tmp_path, small_synth, tmp_path / "run"))
    bundle = load_data(recipe)
    torch.manual_seed(0)
    teacher = build_detector(DetectorSpec(num_classes=bundle.train_source.num_classes, fpn_channels=16, head_convs=1))
    recipe.distill.teacher = "untrained.pt"
    with caplog.at_level(logging.WARNING):
        ap = check_teacher(teacher, bundle, recipe, torch.device("cpu"))
    assert ap < WEAK_TEACHER_AP
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("!!! the teacher's AP (x100) is") and "(untrained.pt)" in w for w in warnings)


@pytest.mark.parametrize(
    "ap, expected, count",
    [(0.0, None, 1), (math.nan, None, 1), (0.5, None, 0), (None, None, 0), (0.31, 0.30, 1), (0.01, 0.3, 2)],
)
def test_weak_teacher_warning_text(caplog, ap, expected, count):
    with caplog.at_level(logging.WARNING):
        messages = warn_if_weak_teacher(ap, where="stores/t", expected_student_ap=expected, min_gain=0.02)
    assert len(messages) == count
    assert [r.getMessage() for r in caplog.records] == messages
    assert all(m.startswith("!!! ") and "(stores/t)" in m for m in messages)
