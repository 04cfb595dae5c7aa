"""The distillation task: gradients, level matching, and the guards against silent failure."""

import pytest
import torch

from detkd.data.loader import Batch
from detkd.data.views import View
from detkd.distill.base import DistillMethod
from detkd.distill.inherit import inherit_neck_and_heads
from detkd.distill.task import DistillationTask, build_method, common_levels
from detkd.errors import ConfigError, DetkdError
from detkd.knowledge import TeacherKnowledge
from detkd.knowledge.online import OnlineTeacher
from detkd.models.builders import build_detector


def _batch(n=2, canvas=64):
    g = torch.Generator().manual_seed(0)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])} for _ in range(n)]
    return Batch(
        images=torch.rand(n, 3, canvas, canvas, generator=g),
        image_sizes=[(canvas, canvas)] * n,
        targets=targets,
        image_ids=list(range(n)),
        views=[View(canvas)] * n,
        orig_sizes=[(canvas, canvas)] * n,
        indices=list(range(n)),
    )


def _task(spec_factory, method="fitnet", teacher_family="fcos", **margs):
    torch.manual_seed(0)
    student = build_detector(spec_factory("fcos"))
    teacher = OnlineTeacher(build_detector(spec_factory(teacher_family, fpn_channels=32)))
    levels = common_levels(student, teacher)
    m = build_method(method, levels=levels, args=margs)
    return DistillationTask(student, methods={method: m}, weights={method: 2.0}, teacher=teacher, levels=list(levels))


def test_gradients_reach_student_and_adapters_never_teacher(spec_factory):
    task = _task(spec_factory)
    task.train()
    losses = task(_batch())
    assert {"fitnet.p3", "classification"} <= set(losses)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in task.methods.parameters())
    assert task.student.model.backbone.body.conv1.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.detector.parameters())
    # The teacher is not part of the trainable module: not in parameters() nor in state_dict().
    assert not any(k.startswith("teacher") for k in task.state_dict())


def test_method_weight_scales_terms(spec_factory):
    task = _task(spec_factory)
    task.eval()
    batch = _batch()
    weighted = task(batch)["fitnet.p3"]
    feats = task.student.features(batch.images, batch.image_sizes)
    raw = task.methods["fitnet"]({k: feats[k] for k in task.levels}, task.teacher.knowledge(batch, task.needs), None)
    torch.testing.assert_close(weighted, 2.0 * raw["fitnet.p3"])


def test_teacher_stays_in_eval_mode(spec_factory):
    task = _task(spec_factory)
    task.train()
    task(_batch())
    assert not task.teacher.detector.training


class _Constant(DistillMethod):
    """Test method returning a constant."""

    def __init__(self, *, levels, value):
        super().__init__(levels=levels)
        self.value = value
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, student, teacher, ctx):
        return {"const": self.scale * self.value}


def _const_task(spec_factory, value):
    torch.manual_seed(0)
    student = build_detector(spec_factory("fcos"))
    teacher = OnlineTeacher(build_detector(spec_factory("fcos")))
    levels = common_levels(student, teacher)
    return DistillationTask(
        student, methods={"c": _Constant(levels=levels, value=value)}, weights={}, teacher=teacher, levels=list(levels)
    )


def test_zero_distillation_loss_stops_the_run(spec_factory):
    task = _const_task(spec_factory, 0.0)
    batch = _batch()
    with pytest.raises(DetkdError, match="exactly 0"):
        for _ in range(25):
            task(batch)


def test_nan_distillation_loss_stops_the_run(spec_factory):
    task = _const_task(spec_factory, float("nan"))
    with pytest.raises(DetkdError, match="not finite"):
        task(_batch())


def test_misaligned_teacher_features_are_refused(spec_factory):
    task = _task(spec_factory)

    class Wrong:
        levels, strides, channels = task.teacher.levels, task.teacher.strides, task.teacher.channels

        def knowledge(self, batch, needs):
            return TeacherKnowledge(features={k: torch.zeros(2, 32, 3, 3) for k in self.levels})

    task.__dict__["teacher"] = Wrong()
    with pytest.raises(DetkdError, match="do not align"):
        task(_batch())


def test_heterogeneous_families_share_common_levels(spec_factory):
    student = build_detector(spec_factory("retinanet"))
    teacher = OnlineTeacher(build_detector(spec_factory("fasterrcnn", fpn_channels=32)))
    levels = common_levels(student, teacher)
    assert list(levels) == ["p3", "p4", "p5", "p6"]
    assert all(s.student_channels == 16 and s.teacher_channels == 32 for s in levels.values())
    with pytest.raises(ConfigError, match="p7"):
        common_levels(student, teacher, ["p3", "p7"])


def test_unknown_method_and_argument_fail_with_names(spec_factory):
    student = build_detector(spec_factory("fcos"))
    levels = common_levels(student, OnlineTeacher(build_detector(spec_factory("fcos"))))
    with pytest.raises(ConfigError, match="unknown distillation method 'fitnett'.*fitnet"):
        build_method("fitnett", levels=levels, args={})
    with pytest.raises(ConfigError, match="fitnet.*bogus"):
        build_method("fitnet", levels=levels, args={"bogus": 1})


def test_inherit_copies_neck_and_heads_only(spec_factory):
    torch.manual_seed(0)
    student = build_detector(spec_factory("fcos"))
    teacher = build_detector(spec_factory("fcos", head_convs=2))
    counts = inherit_neck_and_heads(student, teacher)
    s, t = student.model.state_dict(), teacher.model.state_dict()
    assert counts["copied"] > 0
    assert torch.equal(s["backbone.fpn.layer_blocks.0.0.weight"], t["backbone.fpn.layer_blocks.0.0.weight"])
    assert torch.equal(s["head.classification_head.cls_logits.weight"], t["head.classification_head.cls_logits.weight"])
    assert not torch.equal(s["backbone.body.conv1.weight"], t["backbone.body.conv1.weight"])


def test_gkd_online_computes_teacher_importance_and_trains(spec_factory):
    task = _task(spec_factory, method="gkd")
    task.train()
    losses = task(_batch())
    assert {"gkd.grad", "gkd.fg", "gkd.global"} <= set(losses)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in task.methods.parameters())
    assert all(p.grad is None for p in task.teacher.detector.parameters())


def test_gkd_parity_mode_gets_student_maps_and_carries_no_gradient(spec_factory):
    task = _task(spec_factory, method="gkd", mode="parity")
    task.train()
    losses = task(_batch())
    assert float(losses["gkd.cam"]) > 0 and not losses["gkd.cam"].requires_grad


def test_auto_weight_balances_gradients_then_freezes_and_resumes(spec_factory):
    torch.manual_seed(0)
    student = build_detector(spec_factory("fcos"))
    teacher = OnlineTeacher(build_detector(spec_factory("fcos", fpn_channels=32)))
    levels = common_levels(student, teacher)
    methods = {"fitnet": build_method("fitnet", levels=levels, args={})}

    def make(s):
        return DistillationTask(
            s,
            methods=methods,
            weights={"fitnet": "auto"},
            teacher=teacher,
            levels=list(levels),
            auto_ratio=0.25,
            calibration_steps=2,
        )

    task = make(student)
    task.train()
    batch = _batch()
    losses = task(batch)
    # Step 1 already uses the weight measured on its own batch (not the paper weight 1).
    assert losses["fitnet.p3"].requires_grad
    assert task.weight_report()["fitnet"]["weight"] != 1.0 and task.balance.calibrating
    task(batch)
    frozen = task.weight_report()["fitnet"]
    assert frozen["rule"] == "auto" and frozen["frozen"] and frozen["calibration_steps"] == 2
    task(batch)
    assert task.weight_report()["fitnet"]["weight"] == frozen["weight"]  # no drift after calibration
    # A resumed run replays the frozen weight without measuring again.
    other = make(build_detector(spec_factory("fcos")))
    other.load_extra_state(task.extra_state())
    assert not other.balance.calibrating and other.weight_report()["fitnet"]["weight"] == frozen["weight"]


def test_gkd_parity_teacher_builds_its_grad_cam_like_the_released_code(spec_factory):
    from detkd.knowledge.importance import teacher_importance

    task = _task(spec_factory, method="gkd", mode="parity")
    assert task.teacher.importance_mode == {"channel_mode": "abs", "activation_mode": "abs"}
    batch = _batch()
    got = task.teacher.knowledge(batch, task.needs).importance
    want = teacher_importance(
        task.teacher.detector,
        batch.images,
        batch.image_sizes,
        batch.targets,
        channel_mode="abs",
        activation_mode="abs",
    ).spatial
    signed = teacher_importance(task.teacher.detector, batch.images, batch.image_sizes, batch.targets).spatial
    for lvl in got:
        torch.testing.assert_close(got[lvl], want[lvl])
    assert any(not torch.allclose(got[lvl], signed[lvl]) for lvl in got)


def test_pseudo_targets_keep_the_top_k_above_the_threshold():
    from detkd.knowledge.importance import pseudo_targets

    det = {
        "boxes": torch.arange(20, dtype=torch.float32).reshape(5, 4),
        "scores": torch.tensor([0.2, 0.9, 0.5, 0.31, 0.95]),
        "labels": torch.tensor([1, 2, 3, 4, 5]),
    }
    (out,) = pseudo_targets([det], topk=2, score_thresh=0.3)
    assert out["labels"].tolist() == [5, 2] and out["boxes"].tolist() == [
        det["boxes"][4].tolist(),
        det["boxes"][1].tolist(),
    ]
    (none,) = pseudo_targets([det], topk=10, score_thresh=0.99)
    assert none["boxes"].shape == (0, 4)


def test_gkd_grad_cam_from_teacher_predictions(spec_factory, monkeypatch):
    from detkd.knowledge import online as teacher_mod

    task = _task(spec_factory, method="gkd", cam_targets="predictions", cam_topk=3, cam_score=0.0)
    assert task.teacher.importance_mode["targets"] == "predictions"
    seen = {}
    real = teacher_mod.teacher_importance

    def spy(detector, images, image_sizes, targets, **kw):
        seen["targets"] = targets
        return real(detector, images, image_sizes, targets, **kw)

    monkeypatch.setattr(teacher_mod, "teacher_importance", spy)
    batch = _batch()
    task.teacher.knowledge(batch, task.needs)
    preds = task.teacher.detector.predict(batch.images, batch.image_sizes)
    for used, pred in zip(seen["targets"], preds, strict=True):
        assert len(used["boxes"]) == min(3, len(pred["boxes"]))
        assert used["boxes"].tolist() == pred["boxes"][pred["scores"].argsort(descending=True)[:3]].tolist()
    with pytest.raises(ConfigError, match="cam_targets"):
        _task(spec_factory, method="gkd", cam_targets="anchors")
