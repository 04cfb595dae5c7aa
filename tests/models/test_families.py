"""The detector-family registry: one registration carries a family; defaults have one source."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead

from detkd.config import ModelConfig, load_recipe
from detkd.errors import ConfigError
from detkd.models import DETECTORS, DetectorFamily, DetectorSpec, build_detector, register_family
from detkd.models.defaults import DEFAULTS
from detkd.models.export import deployable
from detkd.models.families import DenseFamily


def _batch() -> tuple[torch.Tensor, list[tuple[int, int]], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 60.0, 50.0]]), "labels": torch.tensor([1])}]
    return torch.rand(1, 3, 128, 128, generator=g), [(128, 112)], targets


@contextmanager
def registered_toy_family() -> Iterator[str]:
    """A family defined here alone: torchvision's stock RetinaNet head (4 plain convs, no norm), one
    square anchor per cell and a finer default anchor than the built-in RetinaNet's 32."""

    @register_family("toy_retinanet")
    class ToyRetinaNet(DenseFamily):
        model_types = (RetinaNet,)
        default_anchor_size = 12

        def build(self, spec: DetectorSpec) -> RetinaNet:
            base = self.anchor_size(spec)
            anchors = AnchorGenerator(tuple((base * 2**i,) for i in range(5)), ((1.0,),) * 5)
            head = RetinaNetHead(spec.fpn_channels, 1, spec.num_classes + 1)
            return RetinaNet(
                self.backbone(spec), spec.num_classes + 1, anchor_generator=anchors, head=head, score_thresh=0.0
            )

    try:
        yield "toy_retinanet"
    finally:
        if "toy_retinanet" in DETECTORS:
            DETECTORS.unregister("toy_retinanet")


@pytest.fixture
def toy_family() -> Iterator[str]:
    with registered_toy_family() as name:
        yield name


def test_a_family_registered_from_a_test_file_builds_and_runs(toy_family: str):
    torch.manual_seed(0)
    det = build_detector(DetectorSpec(family=toy_family, num_classes=2, fpn_channels=16))
    assert det.family == toy_family and type(det.model) is RetinaNet
    assert det.model.anchor_generator.sizes == ((12,), (24,), (48,), (96,), (192,))  # the family's default
    assert len(det.model.head.classification_head.conv) == 4  # torchvision's stock head, not detkd's
    assert det.levels == DETECTORS.get(toy_family).levels() == ["p3", "p4", "p5", "p6", "p7"]

    images, sizes, targets = _batch()
    det.train()
    losses, feats = det.forward_tap(images, sizes, targets)
    assert set(losses) == {"classification", "bbox_regression"} and torch.isfinite(sum(losses.values()))
    det.eval()
    assert det.predict(images, sizes)[0]["boxes"].shape[0] > 0
    assert deployable(det, size=128)([images[0]])[0]["boxes"].shape[1] == 4

    assert ModelConfig(family=toy_family).family == toy_family  # the recipe schema takes it while registered


def test_the_toy_family_is_gone_after_its_test():
    with registered_toy_family() as name:
        assert name in DETECTORS
    assert name not in DETECTORS
    with pytest.raises(KeyError, match="unknown detector family 'toy_retinanet'; available: fasterrcnn, fcos"):
        build_detector(DetectorSpec(family=name))
    with pytest.raises(ValueError, match="unknown detector family 'toy_retinanet'"):
        ModelConfig(family=name)


def test_registering_a_name_twice_is_refused(toy_family: str):
    class Again(DenseFamily):
        pass

    with pytest.raises(ValueError, match="detector family 'toy_retinanet' is already registered"):
        register_family(toy_family)(Again)
    assert Again.name == "" and DETECTORS.get(toy_family).name == toy_family


def test_builtin_families_describe_what_they_build():
    assert DETECTORS.names() == ["fasterrcnn", "fcos", "retinanet"]
    for name, family in DETECTORS.items():
        assert family.name == name and isinstance(family, DetectorFamily)
        torch.manual_seed(0)
        det = build_detector(DetectorSpec(family=name, num_classes=2, fpn_channels=16, head_convs=1, box_head_dim=32))
        assert isinstance(det.model, family.model_types)
        assert det.levels == family.levels(), name  # levels known without building a model
        first_anchor = det.model.rpn.anchor_generator if name == "fasterrcnn" else det.model.anchor_generator
        assert first_anchor.sizes[0][0] == family.default_anchor_size
        heads = det.train_mode_heads()
        assert heads == ([det.model.rpn, det.model.roi_heads] if name == "fasterrcnn" else [])


def test_assigners_come_from_the_family_registrations():
    assert DETECTORS.get("retinanet").assigners == ("iou", "atss")
    assert DETECTORS.get("fcos").assigners == DETECTORS.get("fasterrcnn").assigners == ("iou",)
    with pytest.raises(ValueError, match="assigner 'atss' applies to retinanet only; fasterrcnn has its own"):
        build_detector(DetectorSpec(family="fasterrcnn", assigner="atss"))


# -- one source for the model-spec defaults ----------------------------------------------------------
def test_detector_spec_and_recipe_share_every_default():
    spec = DetectorSpec().to_dict()
    recipe = ModelConfig().model_dump()
    recipe.pop("checkpoint")  # the recipe's own: where initial weights come from
    shared = {k: spec[k] for k in recipe}
    assert recipe == shared
    # Set from the data, and the weights' sha256 recorded by the build: not recipe keys.
    assert set(spec) - set(recipe) == {"num_classes", "image_mean", "image_std", "backbone_weights_sha256"}
    table = dataclasses.asdict(DEFAULTS)
    assert spec == {k: list(v) if isinstance(v, tuple) else v for k, v in table.items()}
    # The recipe's values: every recipe and run so far used them.
    assert (spec["fpn_channels"], spec["head_convs"], spec["box_head_dim"]) == (64, 2, 256)


def test_recipe_family_and_assigner_are_checked_against_the_registry():
    with pytest.raises(ConfigError, match=r"model\.family: .*unknown detector family 'yolo'; available: fasterrcnn"):
        load_recipe(None, ["data.root=x", "model.family=yolo"])
    with pytest.raises(ConfigError, match=r"model\.assigner: .*unknown assigner 'maxiou'; available: atss, iou"):
        load_recipe(None, ["data.root=x", "model.assigner=maxiou"])
    assert load_recipe(None, ["data.root=x", "model.family=retinanet", "model.assigner=atss"]).model.assigner == "atss"
