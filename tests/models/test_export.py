"""Export: the deployable module gives the eager detector's detections."""

import warnings

import torch

from detkd.models import DetectorSpec, build_detector
from detkd.models.assigners import ATSSRetinaNet
from detkd.models.export import deployable, export_detector


def test_atss_retinanet_exports_as_plain_retinanet(tmp_path):
    torch.manual_seed(0)
    spec = DetectorSpec(family="retinanet", num_classes=2, fpn_channels=16, head_convs=1, assigner="atss")
    spec.score_thresh = 0.0  # random weights score ~0.01 (focal-loss prior): keep every detection
    det = build_detector(spec).eval()
    image = [torch.rand(3, 64, 48)]
    eager = deployable(det, size=64)(image)[0]
    path = export_detector(det, tmp_path / "m.ts", fmt="torchscript", size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(path))(image)[1][0]  # scripted RetinaNet returns (losses, detections)
    assert eager["boxes"].shape[0] > 0
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(scripted[key], eager[key])
    assert isinstance(det.model, ATSSRetinaNet)  # exporting leaves the training model as it was
