"""The tap must give exactly the losses of torchvision's own forward, plus the FPN features."""

import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from detkd.models import DetectorSpec, build_detector

FAMILIES = ["retinanet", "fcos", "fasterrcnn"]
# (family, assigner): RetinaNet with ATSS must also match torchvision's own forward of the same model.
VARIANTS = [(f, "iou") for f in FAMILIES] + [("retinanet", "atss")]


def _batch():
    g = torch.Generator().manual_seed(0)
    # Two images of 96x128 and 128x96 on a 128 canvas: torchvision pads its batch to the same 128x128.
    sizes = [(96, 128), (128, 96)]
    images = torch.zeros(2, 3, 128, 128)
    originals = []
    for i, (h, w) in enumerate(sizes):
        img = torch.rand(3, h, w, generator=g)
        images[i, :, :h, :w] = img
        originals.append(img)
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [50.0, 20.0, 120.0, 90.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[10.0, 30.0, 60.0, 120.0]]), "labels": torch.tensor([3])},
    ]
    return images, sizes, originals, targets


@pytest.mark.parametrize(("family", "assigner"), VARIANTS)
def test_tap_losses_equal_torchvision_forward(family, assigner):
    torch.manual_seed(0)
    det = build_detector(
        DetectorSpec(
            family=family,
            backbone="resnet18",
            num_classes=3,
            fpn_channels=32,
            head_convs=1,
            anchor_size=16,
            assigner=assigner,
        )
    )
    det.train()
    images, sizes, originals, targets = _batch()
    # Same preprocessing through torchvision's own transform: scale 1, same normalisation, pad to 32.
    det.model.transform = GeneralizedRCNNTransform(
        min_size=96, max_size=128, image_mean=det.spec["image_mean"], image_std=det.spec["image_std"]
    )
    det.model.transform.eval()  # in train mode it draws a random min_size, shifting the RNG stream
    torch.manual_seed(1)  # Faster R-CNN samples proposals at random
    ours, feats = det.forward_tap(images, sizes, [{k: v.clone() for k, v in t.items()} for t in targets])
    torch.manual_seed(1)
    theirs = det.model(originals, [{k: v.clone() for k, v in t.items()} for t in targets])
    assert set(ours) == set(theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6)
    # Features are named by stride and have the expected strides and channels.
    expected = ["p2", "p3", "p4", "p5", "p6"] if family == "fasterrcnn" else ["p3", "p4", "p5", "p6", "p7"]
    assert list(feats) == expected == det.levels
    for name, f in feats.items():
        assert f.shape[-1] == 128 // det.strides[name]
        assert f.shape[1] == det.channels[name] == 32


@pytest.mark.parametrize("family", FAMILIES)
def test_tap_features_carry_gradient_of_losses(family):
    torch.manual_seed(0)
    det = build_detector(DetectorSpec(family=family, backbone="resnet18", num_classes=3, fpn_channels=16, head_convs=1))
    det.train()
    images, sizes, _, targets = _batch()
    losses, feats = det.forward_tap(images, sizes, targets)
    for f in feats.values():
        f.retain_grad()
    sum(losses.values()).backward()
    # Detection losses flow through the tapped tensors themselves (not copies).
    assert all(f.grad is not None for name, f in feats.items() if name != "p6" or family != "fasterrcnn")


def test_padding_is_zero_after_normalisation():
    det = build_detector(DetectorSpec(family="fcos", backbone="resnet18", num_classes=1, fpn_channels=16))
    x = det.normalize(torch.ones(1, 3, 64, 64), [(32, 48)])
    assert torch.all(x[:, :, 32:, :] == 0) and torch.all(x[:, :, :, 48:] == 0)
    assert torch.all(x[:, :, :32, :48] != 0)


def test_predictions_decode_in_float32_under_float16_autocast(spec_factory):
    """Boxes decoded in float16 are 0.5 px apart from 512 px up; evaluation under AMP decodes in float32."""
    for family in ("fcos", "retinanet"):
        torch.manual_seed(0)
        det = build_detector(spec_factory(family, score_thresh=0.0)).eval()
        images = torch.rand(1, 3, 64, 64)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            pred = det.predict(images, [(64, 64)])[0]
        assert pred["boxes"].dtype == torch.float32 and pred["scores"].dtype == torch.float32, family
