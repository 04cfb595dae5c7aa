"""``detkd distill ... method=NAME args.NAME.KEY=VALUE``: the shorthand sets a keyword argument of the
method the run builds, and a malformed key, an unselected or unknown method, or an argument the
method does not take is refused with a message naming it, before anything is written."""

from __future__ import annotations

import csv

import pytest

from detkd import api
from detkd.cli import main


def _step_terms(run, step: int = 1) -> dict[str, float]:
    """The loss terms a run logged at ``step`` (log.csv)."""
    with open(run / "log.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["phase"] == "train" and r["step"] == str(step)]
    return {r["key"]: float(r["value"]) for r in rows if r["key"] != "lr"}


def test_method_argument_reaches_the_method(tmp_path, small_synth, recipe_factory, checkpoint_factory):
    names = api.open_source(small_synth, format="coco", split="train").class_names
    teacher = checkpoint_factory(tmp_path / "teacher.pt", names, seed=1, fpn_channels=32)
    recipe = str(recipe_factory(tmp_path, small_synth, tmp_path / "unused", train_keys="log_every: 1, device: cpu"))
    common = ["method=fitnet:1", f"teacher={teacher}", "distill.check_teacher=false"]
    # fitnet's own `weight` argument (the paper weight, 1 by default) scales its loss terms; the explicit
    # multiplier 1 keeps the `auto` rule from rescaling them. Same seed, same first batch, same start.
    assert main(["distill", recipe, *common, f"train.out={tmp_path / 'plain'}", "--no-progress"]) == 0
    assert (
        main(["distill", recipe, *common, "args.fitnet.weight=2", f"train.out={tmp_path / 'doubled'}", "--no-progress"])
        == 0
    )

    plain, doubled = _step_terms(tmp_path / "plain"), _step_terms(tmp_path / "doubled")
    fitnet = sorted(k for k in plain if k.startswith("fitnet."))
    assert fitnet and sorted(k for k in doubled if k.startswith("fitnet.")) == fitnet
    for key in fitnet:
        assert plain[key] > 0 and doubled[key] == pytest.approx(2 * plain[key], rel=1e-5), key
    for key in set(plain) - set(fitnet) - {"loss"}:  # the detection terms did not change
        assert doubled[key] == pytest.approx(plain[key], rel=1e-5), key
    # The run records the argument in its recipe, as a number (the value is parsed as YAML).
    saved = api.load_recipe(tmp_path / "doubled" / "recipe.yaml").distill.methods
    assert [(m.name, m.weight, m.args) for m in saved] == [("fitnet", 1.0, {"weight": 2})]
    assert api.load_recipe(tmp_path / "plain" / "recipe.yaml").distill.methods[0].args == {}


@pytest.mark.parametrize(
    "items, message",
    [
        (["method=fitnet", "args.ssim.window_size=7"], "arguments given for methods not selected: ['ssim']"),
        (["args.fitnet.weight=2"], "args.METHOD.KEY=VALUE needs method=METHOD on the same command line"),
        (["method=fitnet", "args.fitnet=2"], "'args.fitnet=2': method arguments are args.METHOD.KEY=VALUE"),
        (
            ["method=fitnet", "args.fitnet.adapter.kind=x"],
            "'args.fitnet.adapter.kind=x': method arguments are args.METHOD.KEY=VALUE",
        ),
        (
            ["method=fitnet+pkd", "args.fitnet.weight=2", "args.cwd.tau=2"],
            "arguments given for methods not selected: ['cwd']",
        ),
        (["method=fitnett", "args.fitnett.weight=2"], "unknown distillation method 'fitnett'; available: "),
    ],
    ids=["unselected", "no-method", "no-key", "dotted-key", "one-unselected", "unknown-method"],
)
def test_malformed_method_argument_is_refused_naming_it(tmp_path, small_synth, recipe_factory, capsys, items, message):
    # The teacher does not exist: each of these must be refused before it is looked for.
    recipe = recipe_factory(tmp_path, small_synth, tmp_path / "run")
    assert main(["distill", str(recipe), *items, f"teacher={tmp_path / 'absent.pt'}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"detkd: error: {message}") and "Traceback" not in err
    if "unknown distillation method" in message:
        assert "fitnet" in err.split("available: ")[1]  # the names to choose from
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "item, named",
    [
        ("args.fitnet.bogus=1", ["method 'fitnet'", "'bogus'"]),
        ("args.fitnet.adapter=conv5x5", ["method 'fitnet'", "'conv5x5'", "conv1x1"]),
    ],
    ids=["unknown-argument", "bad-value"],
)
def test_argument_the_method_refuses_is_named(
    tmp_path, small_synth, recipe_factory, checkpoint_factory, capsys, item, named
):
    names = api.open_source(small_synth, format="coco", split="train").class_names
    teacher = checkpoint_factory(tmp_path / "teacher.pt", names)
    recipe = recipe_factory(tmp_path, small_synth, tmp_path / "run", extra="distill: {check_teacher: false}\n")
    assert main(["distill", str(recipe), "method=fitnet", item, f"teacher={teacher}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("detkd: error: method 'fitnet': ") and "Traceback" not in err
    assert all(n in err for n in named), err
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


@pytest.mark.parametrize("item", ["args..weight=2", "args.fitnet.=2"])
def test_empty_part_of_an_argument_key_is_refused_as_malformed(tmp_path, small_synth, recipe_factory, capsys, item):
    recipe = recipe_factory(tmp_path, small_synth, tmp_path / "run")
    argv = ["distill", str(recipe), "method=fitnet", item, f"teacher={tmp_path / 'absent.pt'}", "--no-progress"]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"detkd: error: {item!r}: method arguments are args.METHOD.KEY=VALUE")
