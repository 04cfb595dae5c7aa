"""A distillation method registered from this file alone runs through ``detkd distill`` like a built-in."""

import json
import math

import pytest
import torch
from torch import nn

from detkd import api
from detkd.cli import main
from detkd.distill.base import METHODS


class ToyL1(api.DistillMethod):
    """Toy: L1 between 1x1-adapted student and teacher features."""

    needs = frozenset({"features"})

    def __init__(self, *, levels, weight: float = 1.0) -> None:
        super().__init__(levels=levels)
        self.weight = float(weight)
        self.adapt = nn.ModuleDict(
            {lv: nn.Conv2d(s.student_channels, s.teacher_channels, 1) for lv, s in self.levels.items()}
        )

    def forward(self, student, teacher, ctx):
        return {
            f"toy.{lv}": self.weight * (self.adapt[lv](student[lv]) - teacher.features[lv]).abs().mean()
            for lv in self.levels
        }


@pytest.fixture
def toy_method():
    api.register_method("toy-l1")(ToyL1)
    yield "toy-l1"
    METHODS.unregister("toy-l1")


def test_a_registered_method_trains_with_the_auto_weight(
    tmp_path, small_synth, recipe_factory, checkpoint_factory, toy_method
):
    names = api.open_source(small_synth, format="coco", split="train").class_names
    teacher = checkpoint_factory(tmp_path / "teacher.pt", names, seed=1, fpn_channels=32)
    recipe = recipe_factory(tmp_path, small_synth, tmp_path / "run", train_keys="device: cpu")
    argv = ["distill", str(recipe), f"method={toy_method}", f"teacher={teacher}", "args.toy-l1.weight=2"]
    assert main([*argv, "distill.calibration_steps=1", "--no-progress"]) == 0
    last = json.loads((tmp_path / "run" / "metrics.json").read_text())["last"]
    report = last["distill_weights"][toy_method]
    assert report["rule"] == "auto" and report["frozen"] and math.isfinite(last["AP"])
    payload = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert payload["run"]["methods"] == [{"name": "toy-l1", "weight": "auto", "args": {"weight": 2}}]
    assert any(
        k.startswith("toy-l1.adapt.") for k in payload["train_state"]["task_extra"]["methods"]
    )  # trained adapters
