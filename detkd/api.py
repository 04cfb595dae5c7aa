"""The Python API in one place. Everything here is also reachable through the CLI.

from detkd import api
recipe = api.load_recipe("configs/shapes_student.yaml", ["train.epochs=4"])
metrics = api.train(recipe)
metrics = api.distill(api.load_recipe("configs/shapes_student.yaml",
                                      ["distill.teacher=stores/t", "distill.methods=[{name: fitnet}]"]))
"""

from __future__ import annotations

from detkd.config import Recipe, load_recipe
from detkd.data.formats.detect import detect_format, open_source
from detkd.data.synthetic import generate_synthetic
from detkd.data.views import View, ViewPolicy
from detkd.distill.base import METHODS, DistillMethod, describe_methods, register_method
from detkd.models.builders import DETECTORS, DetectorSpec, build_detector
from detkd.models.checkpoint import load_detector, save_checkpoint
from detkd.models.export import export_detector
from detkd.runs import distill, evaluate_checkpoint, train

__all__ = [
    "DETECTORS",
    "METHODS",
    "DetectorSpec",
    "DistillMethod",
    "Recipe",
    "View",
    "ViewPolicy",
    "build_detector",
    "describe_methods",
    "detect_format",
    "distill",
    "evaluate_checkpoint",
    "export_detector",
    "generate_synthetic",
    "load_detector",
    "load_recipe",
    "open_source",
    "register_method",
    "save_checkpoint",
    "train",
]
