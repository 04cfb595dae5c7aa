"""Typed recipes: YAML -> validated pydantic models, dotted ``key=value`` overrides, clear errors.

The classes that do the work (detectors, methods, the trainer) take explicit keyword
arguments; this module only maps a recipe onto them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from detkd.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(_Section):
    format: str = "auto"  # auto | coco | voc | yolo | cityscapes | kitti
    root: str  # data set directory or annotation file
    val_root: str | None = None  # defaults to root
    train_split: str = "train"
    val_split: str = "val"
    sizes: list[int] = Field(default_factory=lambda: [128])  # longer image side; several = multi-scale
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    batch_size: int = Field(8, ge=1)
    workers: int = Field(2, ge=0)
    limit: int | None = None  # use only the first N images of each split, train and val (quick runs)
    names: list[str] | None = None  # YOLO / VOC class names in label order (default: from the data set's files)


class ModelConfig(_Section):
    family: Literal["retinanet", "fcos", "fasterrcnn"] = "fcos"
    backbone: str = "resnet18"
    fpn_channels: int = 64
    head_convs: int = 2
    anchor_size: int | None = None
    anchor_scales: int = Field(3, ge=1)  # RetinaNet: octave scales per cell
    anchor_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0])  # RetinaNet: aspect ratios
    assigner: Literal["iou", "atss"] = "iou"  # RetinaNet's anchor labelling
    box_head_dim: int = 256
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    checkpoint: str | None = None  # initial weights (detkd or torchvision state dict)


class TrainConfig(_Section):
    epochs: int = Field(12, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list[int] = Field(default_factory=lambda: [8, 11])  # epochs, for the step schedule
    gamma: float = 0.1
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    grad_clip: float | None = 10.0
    amp: bool = True  # only takes effect on CUDA
    seed: int = 0
    eval_every: int = 1  # epochs; 0 = only at the end
    device: str = "auto"
    log_every: int = 10
    out: str = "runs/default"


class MethodConfig(_Section):
    name: str
    weight: float = 1.0  # multiplies every loss term of the method
    args: dict[str, Any] = Field(default_factory=dict)  # method keyword arguments


class DistillConfig(_Section):
    teacher: str | None = None  # teacher checkpoint, or a knowledge-store directory
    teacher_model: dict[str, Any] | None = None  # spec for a plain torchvision state dict
    methods: list[MethodConfig] = Field(default_factory=list)
    levels: list[str] | None = None  # default: every level teacher and student share
    inherit: bool = False  # copy the teacher's neck and heads into the student where shapes match
    # A store selection policy applied to a live teacher (e.g. {name: nms-ksd, channel_group: 4}):
    # the stored loss without the store, to tell selection effects from storage effects.
    online_selection: dict[str, Any] | None = None
    check_teacher: bool = True  # evaluate the teacher before training and warn if it is weak
    min_teacher_gain: float = 0.02  # AP the teacher must exceed `expected_student_ap` by, if given
    expected_student_ap: float | None = None


class Recipe(_Section):
    name: str = "run"
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=0.02", "data.sizes=[128,160]"]`` -> nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {p!r}")
        node[parts[-1]] = value
    return out


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(path: str | Path | None, overrides: list[str] | dict | None = None) -> Recipe:
    """Read a YAML recipe (or start empty), apply overrides, validate."""
    raw: dict = {}
    source = str(path) if path else "<overrides>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: recipe file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({exc})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    if overrides:
        raw = merge(raw, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    return validate(raw, source=source)


def validate(raw: dict, *, source: str) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {key}: {msg}")
        raise ConfigError(f"{source}: invalid recipe\n" + "\n".join(lines)) from None


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
