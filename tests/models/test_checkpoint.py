"""Loading weights: plain torchvision state dicts, DDP prefixes, architecture mismatches, old specs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from detkd.errors import DetkdError
from detkd.models import DetectorSpec, build_detector
from detkd.models.builders import torchvision_spec
from detkd.models.checkpoint import load_detector, save_checkpoint
from detkd.models.defaults import TORCHVISION_SIZES

# What DetectorSpec() gave before its defaults became the recipe's: every old checkpoint stores all of it.
OLD_DEFAULT_SPEC = {
    "family": "fcos",
    "backbone": "resnet18",
    "num_classes": 1,
    "fpn_channels": 256,
    "head_convs": 4,
    "anchor_size": None,
    "anchor_scales": 3,
    "anchor_ratios": [0.5, 1.0, 2.0],
    "assigner": "iou",
    "box_head_dim": 1024,
    "score_thresh": 0.05,
    "nms_thresh": 0.5,
    "detections_per_img": 100,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}
# Fields added since (a pretrained trunk); an old spec reads them as None: a trunk trained from scratch.
LATER_FIELDS = dict.fromkeys(("backbone_weights", "backbone_weights_sha256", "trainable_layers"))


def _spec(family: str = "fcos", **kw) -> DetectorSpec:
    return DetectorSpec(**{"family": family, "num_classes": 2, "fpn_channels": 16, "head_convs": 1, **kw})


def _weights(spec: DetectorSpec) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_detector(spec).model.state_dict()


def _named(path: Path, message: str) -> str:
    """A pattern for an error that names the file, then says what is wrong."""
    return re.escape(f"{path}: {message}")


def _assert_loaded(detector, state: dict[str, torch.Tensor]) -> None:
    own = detector.model.state_dict()
    assert set(own) == set(state)
    assert all(torch.equal(own[k], v) for k, v in state.items())


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model"])
def test_plain_torchvision_state_dict_loads_given_the_spec(tmp_path: Path, wrap: str):
    state = _weights(_spec())
    path = tmp_path / "tv.pth"
    torch.save(state if wrap == "bare" else {wrap: state}, path)
    torch.manual_seed(1)  # the loaded weights, not this seed's, must end up in the model
    detector, payload = load_detector(path, spec=_spec())
    _assert_loaded(detector, state)
    assert payload["format"] == "torchvision" and payload["class_names"] is None


def test_plain_state_dict_without_a_spec_is_refused_naming_the_file(tmp_path: Path):
    path = tmp_path / "tv.pth"
    torch.save(_weights(_spec()), path)
    with pytest.raises(DetkdError, match=_named(path, "a plain state dict does not say which detector")):
        load_detector(path)


def test_ddp_module_prefix_is_stripped(tmp_path: Path):
    state = _weights(_spec("retinanet"))
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    detector, _ = load_detector(path, spec=_spec("retinanet"))
    _assert_loaded(detector, state)


def test_other_family_names_missing_and_unexpected_keys(tmp_path: Path):
    path = tmp_path / "retina.pth"
    torch.save(_weights(_spec("retinanet")), path)
    with pytest.raises(DetkdError) as info:
        load_detector(path, spec=_spec("fcos"))
    message = str(info.value)
    assert message.startswith(f"{path}: weights do not fit the detector: ")
    assert "10 missing keys (e.g. ['head.classification_head.conv.0.bias'" in message
    assert "6 unexpected keys (e.g. ['head.classification_head.conv.0.0.weight'" in message


def test_other_width_names_the_shape_mismatch(tmp_path: Path):
    path = tmp_path / "wide.pth"
    torch.save(_weights(_spec(fpn_channels=32)), path)
    what = "27 shape mismatches (e.g. backbone.fpn.extra_blocks.p6.bias: checkpoint (32,) vs model (16,))"
    with pytest.raises(DetkdError, match=_named(path, f"weights do not fit the detector: {what}")):
        load_detector(path, spec=_spec())


def test_detkd_checkpoint_of_another_architecture_is_named(tmp_path: Path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, build_detector(_spec()), class_names=["a", "b"])
    expected = _named(path, "checkpoint is another architecture (fpn_channels: checkpoint 16")
    with pytest.raises(DetkdError, match=expected):
        load_detector(path, spec=_spec(fpn_channels=32))


def test_checkpoint_of_an_unregistered_family_is_named(tmp_path: Path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, build_detector(_spec()), class_names=["a", "b"])
    payload = torch.load(path, weights_only=True)
    payload["spec"]["family"] = "yolo"
    torch.save(payload, path)
    expected = _named(path, "cannot build the detector it needs (unknown detector family 'yolo'")
    with pytest.raises(DetkdError, match=expected):
        load_detector(path)


def test_old_checkpoint_spec_is_used_as_stored_not_the_defaults(tmp_path: Path):
    """Checkpoints carry every spec field explicitly, so changing DetectorSpec's defaults changes
    nothing for them: these sizes differ from both the old and the new defaults."""
    stored = {**OLD_DEFAULT_SPEC, "family": "fasterrcnn", "num_classes": 2, "fpn_channels": 24, "head_convs": 3}
    stored["box_head_dim"] = 48
    torch.manual_seed(0)
    original = build_detector(stored)
    path = tmp_path / "old.pt"
    save_checkpoint(path, original, class_names=["a", "b"])
    detector, payload = load_detector(path)
    assert payload["spec"] == {**stored, **LATER_FIELDS} == detector.spec
    assert detector.model.roi_heads.box_head.fc7.out_features == 48
    _assert_loaded(detector, original.model.state_dict())
    # A spec holding every field, as every old checkpoint does, round-trips unchanged (plus the later fields).
    assert DetectorSpec.from_dict(OLD_DEFAULT_SPEC).to_dict() == {**OLD_DEFAULT_SPEC, **LATER_FIELDS}


def test_a_partial_dict_spec_keeps_torchvision_sizes():
    """A dict spec next to a plain state dict (distill.teacher_model) gets the sizes it always got."""
    spec = torchvision_spec({"family": "fasterrcnn", "num_classes": 90})
    sizes = {k: getattr(spec, k) for k in TORCHVISION_SIZES}
    assert sizes == {"fpn_channels": 256, "head_convs": 4, "box_head_dim": 1024}
    assert spec.to_dict() == {**OLD_DEFAULT_SPEC, **LATER_FIELDS, "family": "fasterrcnn", "num_classes": 90}
    assert torchvision_spec({"fpn_channels": 16}).fpn_channels == 16  # what the dict says wins
    with pytest.raises(ValueError, match="unknown detector spec keys"):
        torchvision_spec({"fpn": 16})


def test_an_invalid_dict_spec_is_named_against_the_file(tmp_path: Path):
    path = tmp_path / "tv.pth"
    torch.save(_weights(_spec()), path)
    expected = _named(path, "invalid detector spec given for it (unknown detector spec keys")
    with pytest.raises(DetkdError, match=expected):
        load_detector(path, spec={"family": "fcos", "fpn": 16})
