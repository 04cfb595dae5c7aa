"""``detkd bench accuracy``: mean / spread arithmetic, the table, and resuming finished runs."""

import json

import pytest

from detkd.bench import accuracy
from detkd.bench.accuracy import format_table, run_accuracy, summarise


def test_summarise_mean_spread_and_missing_runs():
    runs = {
        "student": [
            {"AP": 0.05, "AP50": 0.1, "epoch_seconds": 30.0},
            {"AP": 0.04, "AP50": 0.08, "epoch_seconds": 34.0},
        ],
        "fitnet (online)": [{"AP": 0.085, "AP50": 0.16, "epoch_seconds": 50.0}, {"error": "diverged"}],
    }
    table = {t["row"]: t for t in summarise(runs)}
    s = table["student"]
    assert s["seeds"] == 2 and s["AP_mean"] == pytest.approx(0.045) and s["AP_spread"] == pytest.approx(0.01)
    assert s["AP50_mean"] == pytest.approx(0.09) and s["epoch_seconds_mean"] == pytest.approx(32.0)
    f = table["fitnet (online)"]  # a failed seed counts as missing, not as zero
    assert f["seeds"] == 1 and f["AP_mean"] == pytest.approx(0.085) and f["AP_spread"] is None
    text = format_table(summarise(runs), teacher_ap=0.15)
    assert "| student | 2 | 5.0, 4.0 | 4.5 | 1.0 | — | 9.0 | 32 |" in text
    assert "| fitnet (online) | 1 | 8.5 | 8.5 | — | +4.0 | 16.0 | 50 |" in text and "teacher AP 15.0" in text


def test_run_accuracy_reuses_finished_runs(tmp_path, monkeypatch):
    out = tmp_path / "acc"
    aps = {"student": 0.05, "fitnet_online": 0.08, "fitnet_stored": 0.07}
    for name, ap in aps.items():
        for seed in (0, 1):
            run = out / f"{name}-seed{seed}"
            run.mkdir(parents=True)
            last = {"AP": ap + seed / 100, "AP50": 2 * ap, "epoch_seconds": 1.0}
            (run / "metrics.json").write_text(json.dumps({"last": last}))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(accuracy, "load_recipe", no_training)
    table = run_accuracy(
        recipe="unused.yaml", teacher="t.pt", store="store", methods=["fitnet"], seeds=[0, 1], out_dir=out
    )
    rows = {t["row"]: t for t in table}
    assert list(rows) == ["student", "fitnet (online)", "fitnet (stored)"]
    assert rows["fitnet (stored)"]["AP_all"] == pytest.approx([0.07, 0.08])
    assert json.loads((out / "accuracy.json").read_text())["table"] == json.loads(json.dumps(table))


def test_unknown_method_is_refused_before_any_training(tmp_path, monkeypatch):
    from detkd.errors import ConfigError

    monkeypatch.setattr(accuracy, "run_row", lambda *a, **k: pytest.fail("trained before checking the methods"))
    with pytest.raises(ConfigError, match="unknown method 'cwdd'"):
        run_accuracy(
            recipe="r.yaml", teacher="t.pt", store=None, methods=["fitnet", "cwdd"], seeds=[0], out_dir=tmp_path
        )


def test_overrides_swallowed_by_a_list_option_reach_the_recipe(monkeypatch):
    """``--methods cwd data.root=x`` (argparse gives the override to --methods) means cwd plus the override."""
    from detkd.cli import main

    seen = {}

    def record(**kwargs):
        seen.update(kwargs)
        return []

    monkeypatch.setattr(accuracy, "run_accuracy", record)
    monkeypatch.setattr("detkd.models.checkpoint.read_checkpoint", lambda path: {})
    argv = ["bench", "accuracy", "--recipe", "r.yaml", "--teacher", "t.pt", "--store", "s", "gkd=s2", "train.lr=0.1"]
    main(argv + ["--methods", "cwd", "gkd:2", "data.root=/d", "train.epochs=6", "--out", "o", "train.seed=3"])
    assert seen["methods"] == ["cwd", "gkd:2"] and seen["store"] == {"*": "s", "gkd": "s2"}
    assert sorted(seen["overrides"]) == ["data.root=/d", "train.epochs=6", "train.lr=0.1", "train.seed=3"]
