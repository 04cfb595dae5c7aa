"""MobileNetV2 and V3 + FPN under every detector family: builds, runs, and gives the family's levels."""

from __future__ import annotations

import pytest
import torch

from detkd.models import DETECTORS, DetectorSpec, build_detector
from detkd.models.backbones import build_fpn_backbone

FPN = 16


def _batch() -> tuple[torch.Tensor, list[tuple[int, int]], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 128, 128, generator=g)  # 128: P7 (stride 128) is one cell
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 5.0, 50.0, 30.0], [20.0, 20.0, 40.0, 60.0]]), "labels": torch.tensor([2, 1])},
    ]
    return images, [(128, 128), (96, 128)], targets


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "mobilenet_v3"])
@pytest.mark.parametrize("family", DETECTORS.names())
def test_mobilenet_detector_builds_and_runs(family: str, backbone: str):
    torch.manual_seed(0)
    spec = DetectorSpec(family=family, backbone=backbone, num_classes=2, fpn_channels=FPN, head_convs=1)
    det = build_detector(spec)
    expected = ["p2", "p3", "p4", "p5", "p6"] if family == "fasterrcnn" else ["p3", "p4", "p5", "p6", "p7"]
    assert det.levels == expected == DETECTORS.get(family).levels()
    assert det.strides == {lvl: 2 ** int(lvl[1:]) for lvl in expected}
    assert det.channels == dict.fromkeys(expected, FPN)

    images, sizes, targets = _batch()
    det.train()
    losses, feats = det.forward_tap(images, sizes, targets)
    assert list(feats) == expected
    for lvl, f in feats.items():
        assert f.shape == (2, FPN, 128 // det.strides[lvl], 128 // det.strides[lvl])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert det.model.backbone.body["0"][0].weight.grad is not None  # the MobileNet stem trains

    det.eval()
    detections = det.predict(images, sizes)
    assert len(detections) == 2 and all(set(d) >= {"boxes", "scores", "labels"} for d in detections)


@pytest.mark.parametrize(
    ("name", "blocks", "channels"),
    [
        ("mobilenet_v3", ["3", "6", "12", "16"], [24, 40, 112, 960]),
        ("mobilenet_v2", ["3", "6", "13", "18"], [24, 32, 96, 1280]),
    ],
)
def test_mobilenet_stages_feed_the_fpn_at_strides_4_to_32(name: str, blocks: list[str], channels: list[int]):
    backbone = build_fpn_backbone(name, fpn_channels=FPN, extra="pool", returned_layers=[1, 2, 3, 4])
    backbone.eval()
    with torch.no_grad():
        feats = backbone(torch.zeros(1, 3, 128, 128))
    assert [128 // f.shape[-1] for f in feats.values()] == [4, 8, 16, 32, 64]  # + the pooled P6
    assert list(backbone.body.return_layers) == blocks  # the last block of each stride
    assert [b[0].in_channels for b in backbone.fpn.inner_blocks] == channels


def test_unknown_backbone_and_extra_block_are_named():
    with pytest.raises(KeyError, match="unknown backbone 'vgg'; available: resnet18"):
        build_detector(DetectorSpec(backbone="vgg"))
    with pytest.raises(ValueError, match="unknown FPN extra block 'p6'; available: p6p7, pool"):
        build_fpn_backbone("resnet18", fpn_channels=FPN, extra="p6", returned_layers=[2, 3, 4])
