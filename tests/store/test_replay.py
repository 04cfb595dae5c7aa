"""Training from a store: refusal of mismatched stores and methods, and a run with no teacher model."""

import json

import pytest
import torch

from detkd.data.views import View, ViewPolicy
from detkd.distill.capabilities import check_servable
from detkd.distill.task import build_method, common_levels
from detkd.errors import ConfigError
from detkd.models.builders import build_detector
from detkd.models.checkpoint import save_checkpoint
from detkd.store.build import build_store
from detkd.store.format import StoreError
from detkd.store.reader import StoreReader
from detkd.store.replay import check_store_for_run
from detkd.store.select import SelectionPolicy
from detkd.store.teacher import StoredTeacher

POLICY = ViewPolicy(sizes=(64,), flip_prob=0.5)


@pytest.fixture
def teacher(tmp_path, spec_factory, tiny_source):
    torch.manual_seed(0)
    det = build_detector(spec_factory("fcos"))
    save_checkpoint(tmp_path / "teacher.pt", det, class_names=tiny_source.class_names)
    return det


def build(tmp_path, source, folder, policy):
    build_store(
        teacher_checkpoint=tmp_path / "teacher.pt",
        source=source,
        policy=policy,
        views=POLICY.all_views(),
        canvas=POLICY.canvas,
        out_dir=tmp_path / folder,
        progress=False,
    )
    return StoreReader(tmp_path / folder)


def test_mismatched_store_is_refused_naming_the_field(tmp_path, tiny_source, teacher, source_factory, spec_factory):
    reader = build(tmp_path, tiny_source, "s", SelectionPolicy())
    student = build_detector(spec_factory("fcos"))
    check_store_for_run(reader, source=tiny_source, policy=POLICY, student=student)
    other = source_factory(tmp_path / "other", n=6, seed=1)
    with pytest.raises(StoreError, match="dataset_fingerprint differs"):
        check_store_for_run(reader, source=other, policy=POLICY)
    with pytest.raises(StoreError, match=r"preprocessing.canvas differs: store 64px, run 96px") as exc:
        check_store_for_run(reader, source=tiny_source, policy=ViewPolicy(sizes=(96,)))
    assert "views: the store holds sizes [64], the run draws [96]" in str(exc.value)
    # A Faster R-CNN student has p2, which an FCOS teacher's store lacks: refused unless distill.levels excludes it.
    frcnn = build_detector(spec_factory("fasterrcnn"))
    with pytest.raises(StoreError, match=r"levels: .* include \['p2'\]; set distill.levels=\[p3,p4,p5,p6\]"):
        check_store_for_run(reader, source=tiny_source, policy=POLICY, student=frcnn)
    check_store_for_run(reader, source=tiny_source, policy=POLICY, student=frcnn, levels=["p3", "p4"])


def test_methods_that_cannot_consume_the_policy_are_refused(tmp_path, tiny_source, teacher, spec_factory):
    student = build_detector(spec_factory("fcos"))
    sparse = build(tmp_path, tiny_source, "sparse", SelectionPolicy(per_level={"p6": "dense", "p7": "dense"}))
    levels = common_levels(student, StoredTeacher(sparse))

    def method(name, only=None):
        return {
            name: build_method(name, levels={k: v for k, v in levels.items() if only is None or k in only}, args={})
        }

    check_servable(method("fitnet"), sparse.offer())
    with pytest.raises(ConfigError, match=r"method 'ssim' needs whole teacher feature maps .* \['p3', 'p4', 'p5'\]"):
        check_servable(method("ssim"), sparse.offer())
    check_servable(method("ssim", only=("p6", "p7")), sparse.offer())  # the dense levels of a per-level mix are fine
    dense = build(tmp_path, tiny_source, "dense", SelectionPolicy(name="dense", channel_group=1))
    check_servable(method("ssim"), dense.offer())
    with pytest.raises(ConfigError, match="method 'gkd' needs the teacher's gradient-importance maps"):
        check_servable(method("gkd"), dense.offer())


def test_stored_distillation_runs_with_the_teacher_checkpoint_deleted(tmp_path):
    from detkd.config import load_recipe
    from detkd.data.formats.detect import open_source
    from detkd.data.synthetic import generate_synthetic
    from detkd.models.builders import DetectorSpec
    from detkd.runs import distill

    data = generate_synthetic(tmp_path / "data", num_train=8, num_val=4, image_size=64, seed=0)
    source = open_source(data, format="coco", split="train")
    torch.manual_seed(0)
    spec = DetectorSpec(family="fcos", num_classes=source.num_classes, fpn_channels=16, head_convs=1)
    ckpt = tmp_path / "teacher.pt"
    save_checkpoint(ckpt, build_detector(spec), class_names=source.class_names, extra={"metrics": {"AP": 0.5}})
    build_store(
        teacher_checkpoint=ckpt,
        source=source,
        policy=SelectionPolicy(),
        views=POLICY.all_views(),
        canvas=POLICY.canvas,
        out_dir=tmp_path / "store",
        mirror_flips=True,
        progress=False,
    )
    ckpt.unlink()  # no teacher model from here on
    recipe = load_recipe(
        None,
        {
            "data": {"root": str(data), "sizes": [64], "batch_size": 4, "workers": 0},
            "model": {"family": "fcos", "fpn_channels": 16, "head_convs": 1},
            "train": {"epochs": 1, "warmup_iters": 1, "out": str(tmp_path / "run"), "device": "cpu"},
            "distill": {"teacher": str(tmp_path / "store"), "methods": [{"name": "fitnet"}]},
        },
    )
    metrics = distill(recipe, progress=False)
    assert metrics["stored"] is True and 0.0 <= metrics["AP"] <= 1.0
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "AP" in saved["last"]
    run = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)["run"]
    assert run["stored"] is True and run["teacher_ap"] == 0.5
    # The store holds unflipped views only; training served flipped ones by mirroring.
    assert {k.split("/")[1] for k in StoreReader(tmp_path / "store").keys()} == {View(64).key}


def test_online_selection_runs_the_stored_loss_on_a_live_teacher(tmp_path):
    from detkd.config import load_recipe
    from detkd.data.synthetic import generate_synthetic
    from detkd.models.builders import DetectorSpec
    from detkd.runs import distill

    data = generate_synthetic(tmp_path / "data", num_train=8, num_val=4, image_size=64, seed=0)
    torch.manual_seed(0)
    spec = DetectorSpec(family="fcos", num_classes=6, fpn_channels=16, head_convs=1)
    ckpt = tmp_path / "teacher.pt"
    from detkd.data.formats.detect import open_source

    names = open_source(data, format="coco", split="train").class_names
    save_checkpoint(ckpt, build_detector(spec), class_names=names)

    def recipe(method, teacher=ckpt):
        return load_recipe(
            None,
            {
                "data": {"root": str(data), "sizes": [64], "batch_size": 4, "workers": 0},
                "model": {"family": "fcos", "fpn_channels": 16, "head_convs": 1},
                "train": {"epochs": 1, "warmup_iters": 1, "out": str(tmp_path / method), "device": "cpu"},
                "distill": {
                    "teacher": str(teacher),
                    "methods": [{"name": method}],
                    "check_teacher": False,
                    "online_selection": {"name": "nms-ksd", "channel_group": 4},
                },
            },
        )

    metrics = distill(recipe("fitnet"), progress=False)
    assert metrics["stored"] is False and 0.0 <= metrics["AP"] <= 1.0
    run = torch.load(tmp_path / "fitnet" / "last.pt", map_location="cpu", weights_only=False)["run"]
    assert run["online_selection"]["channel_group"] == 4 and run["online_selection"]["name"] == "nms-ksd"
    with pytest.raises(ConfigError, match="needs whole teacher feature maps"):
        distill(recipe("fgd"), progress=False)
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="already selected"):
        distill(recipe("fitnet", teacher=tmp_path / "store"), progress=False)
