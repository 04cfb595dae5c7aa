"""Recipe faults: every out-of-range, non-finite or empty value is a one-line `detkd: error:` naming
the field (or the override / method weight), exit 2, before any data is read or anything written."""

from __future__ import annotations

from pathlib import Path

import pytest

from detkd.cli import main
from detkd.commands.distill import expand_shorthands
from detkd.config import DEFAULT_METHOD_WEIGHT, load_recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def recipe(tmp_path, recipe_factory) -> Path:
    # The data root does not exist: a value that got past validation would fail there instead.
    return recipe_factory(tmp_path, tmp_path / "no-data", tmp_path / "run")


BAD_VALUES = [
    ("data.sizes=[]", "data.sizes: List should have at least 1 item"),
    ("data.sizes=[0]", "data.sizes.0: Input should be greater than or equal to 1"),
    ("data.sizes=[-64]", "data.sizes.0: Input should be greater than or equal to 1"),
    ("data.sizes=[64.5]", "data.sizes.0: Input should be a valid integer"),
    ("data.flip_prob=1.5", "data.flip_prob: Input should be less than or equal to 1"),
    ("data.flip_prob=.nan", "data.flip_prob: Input should be a finite number"),
    ("data.batch_size=0", "data.batch_size: Input should be greater than or equal to 1"),
    ("data.workers=-1", "data.workers: Input should be greater than or equal to 0"),
    ("data.limit=0", "data.limit: Input should be greater than or equal to 1"),
    ("data.root=", "data.root: Input should be a valid string"),
    ("model.fpn_channels=0", "model.fpn_channels: Input should be greater than or equal to 1"),
    ("model.head_convs=-1", "model.head_convs: Input should be greater than or equal to 0"),
    ("model.anchor_size=0", "model.anchor_size: Input should be greater than or equal to 1"),
    ("model.anchor_ratios=[]", "model.anchor_ratios: List should have at least 1 item"),
    ("model.anchor_ratios=[0.5,0]", "model.anchor_ratios.1: Input should be greater than 0"),
    ("model.anchor_ratios=[.inf]", "model.anchor_ratios.0: Input should be a finite number"),
    ("model.box_head_dim=0", "model.box_head_dim: Input should be greater than or equal to 1"),
    ("model.score_thresh=1.5", "model.score_thresh: Input should be less than or equal to 1"),
    ("model.nms_thresh=-0.1", "model.nms_thresh: Input should be greater than or equal to 0"),
    ("model.detections_per_img=0", "model.detections_per_img: Input should be greater than or equal to 1"),
    ("train.lr=.inf", "train.lr: Input should be a finite number"),
    ("train.lr=.nan", "train.lr: Input should be a finite number"),
    ("train.lr=0", "train.lr: Input should be greater than 0"),
    ("train.lr=-0.01", "train.lr: Input should be greater than 0"),
    ("train.epochs=0", "train.epochs: Input should be greater than or equal to 1"),
    ("train.momentum=1", "train.momentum: Input should be less than 1"),
    ("train.weight_decay=-1e-4", "train.weight_decay: Input should be greater than or equal to 0"),
    ("train.milestones=[-1]", "train.milestones.0: Input should be greater than or equal to 0"),
    ("train.gamma=0", "train.gamma: Input should be greater than 0"),
    ("train.warmup_iters=-1", "train.warmup_iters: Input should be greater than or equal to 0"),
    ("train.warmup_factor=2", "train.warmup_factor: Input should be less than or equal to 1"),
    ("train.grad_clip=0", "train.grad_clip: Input should be greater than 0"),
    ("train.grad_clip=-.inf", "train.grad_clip: Input should be a finite number"),
    ("train.seed=-1", "train.seed: Input should be greater than or equal to 0"),
    ("train.eval_every=-1", "train.eval_every: Input should be greater than or equal to 0"),
    ("train.out=''", "train.out: String should have at least 1 character"),
    ("distill.levels=[]", "distill.levels: List should have at least 1 item"),
    ("distill.expected_student_ap=2", "distill.expected_student_ap: Input should be less than or equal to 1"),
    ("distill.min_teacher_gain=.nan", "distill.min_teacher_gain: Input should be a finite number"),
    (
        "distill.methods=[{name: fitnet, weight: -1}]",
        "distill.methods.0.weight: Value error, a method weight must be a finite number >= 0",
    ),
    (
        "distill.methods=[{name: fitnet, weight: .inf}]",
        "distill.methods.0.weight: Value error, a method weight must be a finite",
    ),
    ("distill.methods=[{name: ''}]", "distill.methods.0.name: String should have at least 1 character"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_is_refused_naming_the_field(tmp_path, recipe, capsys, override, message):
    assert main(["train", str(recipe), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"detkd: error: {tmp_path / 'r.yaml'}: invalid recipe\n")
    assert f"  {message}" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything ran


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.sizes=[64", "override 'data.sizes=[64': the value '[64' is not valid YAML"),
        ("train.lr={", "override 'train.lr={': the value '{' is not valid YAML"),
        ("train..lr=0.1", "override 'train..lr=0.1': 'train..lr' is not a dotted key"),
        ("train.lr", "override 'train.lr' is not of the form key=value"),
    ],
)
def test_override_that_does_not_parse_is_named(tmp_path, recipe, capsys, override, message):
    assert main(["train", str(recipe), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"detkd: error: {message}") and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "method, shown",
    [
        ("fitnet:abc", "method weight 'abc'"),
        ("fitnet:-1", "method weight '-1'"),
        ("fitnet:nan", "method weight 'nan'"),
        ("fitnet:inf", "method weight 'inf'"),
        ("pkd+fitnet:-0.5", "method weight '-0.5'"),
        ("fitnet+", "a method name is missing"),
        (":2", "a method name is missing"),
    ],
)
def test_method_shorthand_with_a_bad_weight_names_the_value(recipe, capsys, method, shown):
    assert main(["distill", str(recipe), f"method={method}", "teacher=t.pt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"detkd: error: 'method={method}': {shown}") and "Traceback" not in err


def test_method_argument_value_that_is_not_yaml(recipe, capsys):
    argv = ["distill", str(recipe), "method=ssim", "args.ssim.window_size=[7", "teacher=t.pt"]
    assert main(argv) == 2
    assert "detkd: error: args.ssim.window_size=[7: the value '[7' is not valid YAML" in capsys.readouterr().err


def test_good_values_still_pass(recipe):
    overrides = expand_shorthands(["method=fitnet:0+pkd:0.5", "args.pkd.eps=0.001", "teacher=t.pt"])
    r = load_recipe(recipe, [*overrides, "train.grad_clip=null", "model.head_convs=0", "data.sizes=[64,96]"])
    assert [(m.name, m.weight, m.args) for m in r.distill.methods] == [
        ("fitnet", 0.0, {}),
        ("pkd", 0.5, {"eps": 0.001}),
    ]
    assert r.train.grad_clip is None and r.data.sizes == [64, 96] and r.model.head_convs == 0


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    load_recipe(path)  # the ranges are not tighter than the recipes the project ships


def test_weight_rules_by_name(recipe):
    overrides = expand_shorthands(["method=fitnet:auto+pkd:paper+cwd", "teacher=t.pt"])
    r = load_recipe(recipe, overrides)
    # A method without a weight gets the recipe's default rule.
    assert [(m.name, m.weight) for m in r.distill.methods] == [
        ("fitnet", "auto"),
        ("pkd", "paper"),
        ("cwd", DEFAULT_METHOD_WEIGHT),
    ]
