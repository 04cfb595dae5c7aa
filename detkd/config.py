"""Typed recipes: YAML -> validated pydantic models, dotted ``key=value`` overrides, clear errors.

The classes that do the work (detectors, methods, the trainer) take explicit keyword
arguments; this module only maps a recipe onto them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from detkd.data.defaults import BATCH_SIZE, INPUT_SIZE
from detkd.distill.balance import DEFAULT_MEASURE, DEFAULT_RATIO, DEFAULT_STEPS, WEIGHT_RULES
from detkd.engine.defaults import TRAIN
from detkd.errors import ConfigError
from detkd.models.defaults import DEFAULTS as MODEL

DEFAULT_METHOD_WEIGHT = "auto"  # chosen on the shapes benchmark (README "Loss weights")


class _Section(BaseModel):
    # allow_inf_nan=False: every float field must be finite (train.lr=.inf once trained NaN weights).
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1)]


class DataConfig(_Section):
    format: str = "auto"  # auto (detect from the files) or a registered data format (detkd.data.formats)
    root: Name  # data set directory or annotation file
    val_root: Name | None = None  # defaults to root
    train_split: Name = "train"
    val_split: Name = "val"
    # Longer image side; several = multi-scale.
    sizes: list[PositiveInt] = Field(default_factory=lambda: [INPUT_SIZE], min_length=1)
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    batch_size: int = Field(BATCH_SIZE, ge=1)
    workers: int = Field(2, ge=0)
    limit: int | None = Field(None, ge=1)  # use only the first N images of each split, train and val (quick runs)
    names: list[str] | None = None  # YOLO / VOC class names in label order (default: from the data set's files)

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        # The format registry, not a closed list: a format registered by user code is a valid value.
        from detkd.data.formats.base import FORMATS  # on use: importing the schema does not import the readers

        if v != "auto" and v not in FORMATS:
            raise ValueError(f"unknown data format {v!r}; available: auto, {', '.join(FORMATS.names())}")
        return v


class ModelConfig(_Section):
    # Defaults: detkd.models.defaults, the one table DetectorSpec reads too.
    family: Name = MODEL.family  # a registered detector family (detkd.models.DETECTORS)
    backbone: Name = MODEL.backbone
    fpn_channels: int = Field(MODEL.fpn_channels, ge=1)
    head_convs: int = Field(MODEL.head_convs, ge=0)  # 0: no conv tower, the predictors sit on the FPN maps
    anchor_size: int | None = Field(MODEL.anchor_size, ge=1)  # null: the family's default
    anchor_scales: int = Field(MODEL.anchor_scales, ge=1)  # RetinaNet: octave scales per cell
    # RetinaNet: aspect ratios.
    anchor_ratios: list[PositiveFloat] = Field(default_factory=lambda: list(MODEL.anchor_ratios), min_length=1)
    assigner: Name = MODEL.assigner  # anchor labelling (RetinaNet: iou | atss); a family's registration lists its own
    box_head_dim: int = Field(MODEL.box_head_dim, ge=1)
    score_thresh: float = Field(MODEL.score_thresh, ge=0.0, le=1.0)
    nms_thresh: float = Field(MODEL.nms_thresh, ge=0.0, le=1.0)
    detections_per_img: int = Field(MODEL.detections_per_img, ge=1)
    checkpoint: str | None = None  # initial weights (detkd or torchvision state dict)
    # Initial trunk weights: a local torchvision classification state dict or detection checkpoint.
    backbone_weights: Name | None = MODEL.backbone_weights
    # Trunk stages that train, from the top (torchvision's count); with backbone_weights only.
    # null: torchvision's 3 with backbone_weights, all without. Frozen stages get FrozenBatchNorm2d.
    trainable_layers: int | None = Field(MODEL.trainable_layers, ge=0)

    # The registry is imported when a recipe is validated, not when this module is: it needs torchvision.
    @field_validator("family")
    @classmethod
    def _registered_family(cls, v: str) -> str:
        from detkd.models.families import DETECTORS

        if v not in DETECTORS:
            raise ValueError(f"unknown detector family {v!r}; available: {', '.join(DETECTORS.names())}")
        return v

    @field_validator("assigner")
    @classmethod
    def _known_assigner(cls, v: str) -> str:
        from detkd.models.families import all_assigners

        if v not in all_assigners():
            raise ValueError(f"unknown assigner {v!r}; available: {', '.join(all_assigners())}")
        return v

    @model_validator(mode="after")
    def _pretrained_trunk(self) -> ModelConfig:
        if self.backbone_weights is not None and self.checkpoint is not None:
            raise ValueError("model.checkpoint and model.backbone_weights: give one (a checkpoint replaces the trunk)")
        if self.trainable_layers is None:
            return self
        if self.backbone_weights is None:
            raise ValueError("model.trainable_layers applies to a pretrained trunk: give model.backbone_weights too")
        from detkd.models.backbones import BACKBONES, max_trainable_layers

        if self.backbone in BACKBONES and self.trainable_layers > max_trainable_layers(self.backbone):
            top = max_trainable_layers(self.backbone)
            raise ValueError(f"model.trainable_layers: {self.backbone} has {top} stages (0..{top})")
        return self


class TrainConfig(_Section):
    epochs: int = Field(TRAIN.epochs, ge=1)
    optimizer: Literal["sgd", "adamw"] = TRAIN.optimizer
    lr: float = Field(TRAIN.lr, gt=0)
    momentum: float = Field(TRAIN.momentum, ge=0.0, lt=1.0)
    weight_decay: float = Field(TRAIN.weight_decay, ge=0.0)
    # Learning rate of the backbone trunk relative to train.lr (a pretrained trunk: e.g. 0.1).
    backbone_lr_mult: float = Field(TRAIN.backbone_lr_mult, gt=0.0)
    schedule: Literal["cosine", "step", "constant"] = TRAIN.schedule
    # Epochs, for the step schedule.
    milestones: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: list(TRAIN.milestones))
    gamma: float = Field(TRAIN.gamma, gt=0.0)
    warmup_iters: int = Field(TRAIN.warmup_iters, ge=0)
    warmup_factor: float = Field(TRAIN.warmup_factor, ge=0.0, le=1.0)
    grad_clip: float | None = Field(TRAIN.grad_clip, gt=0.0)  # null: no clipping
    amp: bool = TRAIN.amp  # only takes effect on CUDA
    seed: int = Field(TRAIN.seed, ge=0)
    eval_every: int = Field(TRAIN.eval_every, ge=0)  # epochs; 0 = only at the end
    device: Name = "auto"
    log_every: int = Field(TRAIN.log_every, ge=0)  # steps; 0 behaves as 1
    out: Name = "runs/default"


class MethodConfig(_Section):
    name: Name
    # auto: calibrated so the method's push on the student's features is distill.auto_ratio times the
    # detection loss's (detkd.distill.balance); paper: the published weight as is; a number: a fixed
    # multiplier of the paper-weighted loss.
    weight: Literal["auto", "paper"] | float = DEFAULT_METHOD_WEIGHT
    args: dict[str, Any] = Field(default_factory=dict)  # method keyword arguments

    @field_validator("weight", mode="before")
    @classmethod
    def _weight(cls, v: Any) -> float | str:
        return method_weight_value(v)


def method_weight_value(v: Any) -> float | str:
    """A method weight: "auto", "paper" or a finite number >= 0 (ValueError otherwise)."""
    if v in WEIGHT_RULES:
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"a method weight is 'auto', 'paper' or a finite number >= 0, got {v!r}")
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"a method weight must be a finite number >= 0 ('auto' or 'paper' also work), got {v}")
    return float(v)


class DistillConfig(_Section):
    teacher: Name | None = None  # teacher checkpoint, or a knowledge-store directory
    teacher_model: dict[str, Any] | None = None  # spec for a plain torchvision state dict
    methods: list[MethodConfig] = Field(default_factory=list)
    levels: list[Name] | None = Field(None, min_length=1)  # default: every level teacher and student share
    inherit: bool = False  # copy the teacher's neck and heads into the student where shapes match
    # A store selection policy applied to a live teacher (e.g. {name: nms-ksd, channel_group: 4}):
    # the stored loss without the store, to tell selection effects from storage effects.
    online_selection: dict[str, Any] | None = None
    auto_ratio: float = Field(DEFAULT_RATIO, gt=0, allow_inf_nan=False)  # `auto`: method / detection push
    auto_measure: Literal["grad", "loss"] = DEFAULT_MEASURE  # `auto` balances gradient norms or loss values
    calibration_steps: int = Field(DEFAULT_STEPS, ge=1)  # steps that calibrate `auto` weights
    check_teacher: bool = True  # evaluate the teacher before training and warn if it is weak
    # AP the teacher must exceed `expected_student_ap` by, if given.
    min_teacher_gain: float = Field(0.02, ge=-1.0, le=1.0)
    expected_student_ap: float | None = Field(None, ge=0.0, le=1.0)


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
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: {key!r} is not a dotted key such as train.lr")
        value = parse_value(raw, what=f"override {item!r}")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {p!r}")
        node[parts[-1]] = value
    return out


def parse_value(raw: str, *, what: str) -> Any:
    """A command-line value as YAML (``[64,128]``, ``null``, ``0.02``); ConfigError naming ``what``."""
    if raw == "":
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{what}: the value {raw!r} is not valid YAML ({reason})") from None


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
