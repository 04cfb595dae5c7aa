"""Export the student alone (no teacher, no adapters) as TorchScript or ONNX.

The exported module is the torchvision detector with its own transform set to detkd's
preprocessing (longer side resized to ``size``, same normalisation), so it takes a list of
float [3, H, W] images in [0, 1] of any size and returns boxes in their coordinates.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from detkd.errors import DetkdError
from detkd.models.detector import Detector


def deployable(detector: Detector, *, size: int) -> torch.nn.Module:
    model = detector.deployable_model()  # a copy: the training model stays as it is
    # min_size == max_size == size: the longer side is scaled to `size` unless the shorter one
    # would exceed it first, which cannot happen, so this is detkd's "longer side = size" rule.
    model.transform = GeneralizedRCNNTransform(
        min_size=size, max_size=size, image_mean=detector.spec["image_mean"], image_std=detector.spec["image_std"]
    )
    return model


def export_detector(detector: Detector, out: str | Path, *, fmt: str, size: int) -> Path:
    out = Path(out)
    model = deployable(detector, size=size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's scripting/tracing warnings say nothing actionable here
        _export(model, out, fmt=fmt, size=size)
    return out


def _export(model: torch.nn.Module, out: Path, *, fmt: str, size: int) -> None:
    if fmt == "torchscript":
        scripted = torch.jit.script(model)
        scripted.save(str(out))
    elif fmt == "onnx":
        try:
            import onnx  # noqa: F401  (the exporter needs it)
        except ImportError:
            raise DetkdError("ONNX export needs the onnx package: pip install 'detkd[export]'") from None
        example = [torch.rand(3, size, size)]
        torch.onnx.export(
            model,
            (example,),
            str(out),
            opset_version=17,
            input_names=["image"],
            output_names=["boxes", "scores", "labels"],
            dynamo=False,
        )
    else:
        raise DetkdError(f"unknown export format {fmt!r} (torchscript or onnx)")
