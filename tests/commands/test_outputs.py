"""What a run leaves behind and prints: strict JSON, epochs from 1, evaluations at their real step,
validation rows in log.csv, one AP scale (x100, labelled) on screen, data.limit on both splits."""

from __future__ import annotations

import csv
import logging
import math

import pytest
import torch

from detkd.cli import main
from detkd.config import load_recipe
from detkd.jsonio import dumps
from detkd.runs.setup import load_data


def test_dumps_writes_null_for_non_finite_numbers(strict_json):
    text = dumps({"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": {"d": torch.tensor(float("nan"))}})
    assert strict_json(text) == {"a": None, "b": [None, None, 1.5], "c": {"d": None}}


def test_run_outputs(tmp_path, synth, recipe_factory, strict_json, capsys, caplog):
    run = tmp_path / "run"

    def recipe(epochs: int) -> str:
        options = dict(batch_size=4, epochs=epochs, train_keys="log_every: 10", name=f"r{epochs}.yaml")
        return str(recipe_factory(tmp_path, synth, run, **options))

    caplog.set_level(logging.INFO, logger="detkd")
    assert main(["train", recipe(2), "--no-progress"]) == 0
    # 8 images / batch 4 = 2 steps per epoch; log_every=10 logs step 1 only, evaluations run after steps 2 and 4.
    saved = strict_json((run / "metrics.json").read_text())
    assert [h["epoch"] for h in saved["history"]] == [1, 2] and saved["last"]["epoch"] == 2
    assert saved["last"]["APl"] is None  # no large objects in 64 px images: undefined, null (was NaN)
    lines = [strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m["step"]) for m in lines] == [(1, 2), (2, 4)]
    with open(run / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["epoch"] for r in rows if r["phase"] == "train"} == {"1"}
    val = {(r["epoch"], r["step"]) for r in rows if r["phase"] == "val" and r["key"] == "AP"}
    assert val == {("1", "2"), ("2", "4")}
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=False)["epoch"] == 2
    # On screen: the same epoch numbers, and AP x100 with its label.
    out = capsys.readouterr().out
    assert f"AP (x100): AP {100 * saved['last']['AP']:.1f}" in out
    assert any("epoch 2/2 done" in m and "AP (x100)" in m for m in caplog.messages)

    # Resuming one more epoch keeps the numbering and drops nothing twice.
    assert main(["train", recipe(3), "--resume", "--no-progress"]) == 0
    saved = strict_json((run / "metrics.json").read_text())
    assert [h["epoch"] for h in saved["history"]] == [1, 2, 3]
    lines = [strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m["step"]) for m in lines] == [(1, 2), (2, 4), (3, 6)]

    # eval: strict JSON and the labelled scale.
    capsys.readouterr()
    eval_json = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(run / "last.pt"), "--data", str(synth), "--workers", "0"]
    assert main([*args, "--json", str(eval_json)]) == 0
    assert "AP (x100)" in capsys.readouterr().out
    assert strict_json(eval_json.read_text())["APl"] is None


def test_data_limit_applies_to_both_splits_and_says_so(synth, caplog):
    caplog.set_level(logging.INFO, logger="detkd")
    recipe = load_recipe(None, {"data": {"root": str(synth), "limit": 3}})
    bundle = load_data(recipe)
    assert len(bundle.train_source) == 3 and len(bundle.val_source) == 3
    assert any(
        "data.limit=3" in m and "first 3 of 8 training" in m and "first 3 of 4 validation" in m for m in caplog.messages
    )


def test_bench_json_is_strict(tmp_path, strict_json):
    from detkd.bench import accuracy
    from detkd.bench.speed import write_results

    write_results({"ratio": math.nan, "rounds": [1.0, math.inf]}, tmp_path / "speed.json")
    saved = strict_json((tmp_path / "speed.json").read_text())
    assert {k: saved[k] for k in ("ratio", "rounds")} == {"ratio": None, "rounds": [1.0, None]}
    assert {"command", "commit", "date", "machine"} <= saved.keys()  # provenance, as every results file
    # A finished run's metrics with an undefined metric (as older versions wrote it: bare NaN) is reused.
    run = tmp_path / "acc" / "student-seed0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text('{"last": {"AP": 0.05, "AP50": 0.1, "APs": NaN, "epoch_seconds": 1.0}}')
    accuracy.run_accuracy(recipe="unused.yaml", teacher="t.pt", store=None, methods=[], seeds=[0], out_dir=run.parent)
    saved = strict_json((run.parent / "accuracy.json").read_text())
    assert saved["runs"]["student"][0]["APs"] is None


def test_default_bench_outputs_are_ignored_by_git(tmp_path):
    import shutil
    import subprocess
    from pathlib import Path

    from detkd.cli import build_parser

    repo = Path(__file__).resolve().parents[2]
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    bench = next(a for a in build_parser()._actions if a.dest == "command").choices["bench"]
    kinds = next(a for a in bench._actions if a.dest == "bench_command").choices
    speed_out = kinds["speed"].get_default("out")
    accuracy_out = kinds["accuracy"].get_default("out")
    paths = [f"{speed_out}/speed.json", f"{accuracy_out}/accuracy.json", f"{accuracy_out}/accuracy.md", "speed.json"]
    proc = subprocess.run(["git", "check-ignore", *paths], cwd=repo, capture_output=True, text=True)
    assert sorted(proc.stdout.split()) == sorted(paths), proc.stderr
