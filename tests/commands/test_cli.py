"""CLI smoke tests: the commands a user types, on data the test writes itself."""

import json
import math

import pytest
import torch

from detkd.cli import main
from detkd.distill.base import METHODS


def test_help_lists_every_method(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for name in METHODS.names():
        assert name in text
    assert {"fitnet", "pkd", "cwd", "fgd", "defeat", "structured", "ssim", "gkd"} <= set(METHODS.names())


def test_inspect_reports_counts(synth, capsys):
    assert main(["data", "inspect", str(synth)]) == 0
    out = capsys.readouterr().out
    assert "format coco" in out and "split train: 8 images" in out and "split val: 4 images" in out


def test_train_eval_export(tmp_path, synth, recipe_factory, capsys, strict_json):
    run = tmp_path / "run"
    assert main(["train", str(recipe_factory(tmp_path, synth, run, batch_size=4)), "--no-progress"]) == 0
    assert (run / "best.pt").is_file() and (run / "curves.png").is_file() and (run / "log.csv").is_file()
    metrics = json.loads((run / "metrics.json").read_text())["last"]
    assert 0.0 <= metrics["AP"] <= 1.0
    # A second train into the same directory must not silently overwrite it.
    assert main(["train", str(recipe_factory(tmp_path, synth, run, batch_size=4)), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--data", str(synth), "--workers", "0"]) == 0
    assert "AP50" in capsys.readouterr().out
    # Written beside the checkpoint by default. That these are the API's numbers, at the size the model
    # was trained at, is tests/test_api.py's test_train_evaluate_and_distill_through_the_api.
    evaluated = strict_json((run / "last.eval.json").read_text())
    assert evaluated["num_images"] == 4 and 0.0 <= evaluated["AP"] <= 1.0
    assert main(["export", str(run / "last.pt"), "--format", "torchscript", "--out", str(tmp_path / "m.ts")]) == 0
    assert (tmp_path / "m.ts").stat().st_size > 0


def test_online_distill_one_epoch(tmp_path, synth, recipe_factory, capsys, done_lines):
    teacher = tmp_path / "teacher"
    assert main(["train", str(recipe_factory(tmp_path, synth, teacher, batch_size=4)), "--no-progress"]) == 0
    student = tmp_path / "student"
    capsys.readouterr()
    code = main(
        [
            "distill",
            str(recipe_factory(tmp_path, synth, student, batch_size=4)),
            "method=fitnet:auto+pkd:0.5",
            f"teacher={teacher / 'last.pt'}",
            "distill.calibration_steps=1",
            "--no-progress",
        ]
    )
    assert code == 0
    saved = json.loads((student / "metrics.json").read_text())["last"]
    assert saved["epoch"] == 1 and math.isfinite(saved["AP"]) and 0.0 <= saved["AP"] <= 1.0
    # What it prints is the run's own result: the AP figures of metrics.json, the run directory.
    out = capsys.readouterr().out
    [(shown, where)] = done_lines(out)
    assert where == str(student) and set(shown) == {"AP", "AP50", "AP75", "voc_map50"}
    for key, value in shown.items():
        assert value == pytest.approx(100 * saved[key], abs=0.05 + 1e-9), key
    assert "stored teacher: False  inheriting init: False" in out
    # The result says which rule set each weight, and the checkpoint replays it.
    weights = saved["distill_weights"]
    assert sorted(weights) == ["fitnet", "pkd"]
    assert weights["pkd"] == {"rule": "explicit", "weight": 0.5}
    auto = weights["fitnet"]
    assert auto["rule"] == "auto" and auto["frozen"] and auto["calibration_steps"] == 1 and auto["weight"] > 0
    state = torch.load(student / "last.pt", weights_only=True)["train_state"]["task_extra"]["balance"]
    assert state["observed"] == 1 and state["det_sum"] > 0


def test_errors_name_the_problem(tmp_path, synth, recipe_factory, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: recipe file not found" in capsys.readouterr().err
    bad = recipe_factory(tmp_path, tmp_path / "nowhere", tmp_path / "x", batch_size=4)
    assert main(["train", str(bad), "--no-progress"]) == 2
    assert "nowhere" in capsys.readouterr().err
    student = recipe_factory(tmp_path, synth, tmp_path / "s", batch_size=4)
    assert main(["distill", str(student), "method=fitnet", f"teacher={tmp_path / 'nope.pt'}"]) == 2
    assert "nope.pt: teacher checkpoint or store not found" in capsys.readouterr().err
    assert main(["distill", str(student), "method=fitnett", f"teacher={tmp_path / 'nope.pt'}"]) == 2
    assert "unknown distillation method 'fitnett'" in capsys.readouterr().err


def test_store_build_info_verify_and_stored_distill_without_teacher(tmp_path, synth, recipe_factory, capsys):
    teacher = tmp_path / "teacher"
    assert main(["train", str(recipe_factory(tmp_path, synth, teacher, batch_size=4)), "--no-progress"]) == 0
    ckpt = tmp_path / "t.pt"
    (teacher / "last.pt").rename(ckpt)
    store = tmp_path / "store"
    assert (
        main(
            [
                "store",
                "build",
                "--teacher",
                str(ckpt),
                "--data",
                str(synth),
                "--size",
                "64",
                "--workers",
                "0",
                "--out",
                str(store),
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "16 image-views" in out and "dense fp16 maps of the stored levels" in out
    assert main(["store", "verify", str(store)]) == 0
    ckpt.unlink()  # stored distillation needs no teacher model at all
    student = tmp_path / "student"
    assert (
        main(
            [
                "distill",
                str(recipe_factory(tmp_path, synth, student, batch_size=4)),
                "method=fitnet",
                f"teacher={store}",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "stored teacher: True" in capsys.readouterr().out
    # Methods that need whole maps are refused before training on a sparse store.
    assert (
        main(
            [
                "distill",
                str(recipe_factory(tmp_path, synth, tmp_path / "s2", batch_size=4)),
                "method=ssim",
                f"teacher={store}",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "'ssim' needs whole teacher feature maps" in capsys.readouterr().err
    # One flipped byte in one record is caught by verify.
    import lmdb

    from detkd.store.lmdb_env import release

    release(store / "records.lmdb")  # this process still holds the read-only handle (lmdb opens once)
    env = lmdb.open(str(store / "records.lmdb"), subdir=True)
    with env.begin(write=True) as txn:
        key, value = next(iter(txn.cursor()))
        damaged = bytearray(value)
        damaged[-1] ^= 0xFF
        txn.put(key, bytes(damaged))
    env.close()
    assert main(["store", "verify", str(store)]) == 1


def test_bench_accuracy_with_stored_and_selected_rows(tmp_path, synth, recipe_factory, capsys):
    teacher = tmp_path / "teacher"
    assert main(["train", str(recipe_factory(tmp_path, synth, teacher, batch_size=4)), "--no-progress"]) == 0
    ckpt, store = teacher / "last.pt", tmp_path / "store"
    build = ["store", "build", "--teacher", str(ckpt), "--data", str(synth), "--size", "64", "--workers", "0"]
    assert main([*build, "--channel-group", "2", "--out", str(store), "--no-progress"]) == 0
    out = tmp_path / "bench"
    args = ["bench", "accuracy", "--recipe", str(recipe_factory(tmp_path, synth, tmp_path / "unused", batch_size=4))]
    args += ["--teacher", str(ckpt), "--store", str(store), "--selected", "--methods", "fitnet", "--seeds", "0"]
    assert main([*args, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for row in ("student", "fitnet (online)", "fitnet (stored)", "fitnet (selected online)"):
        assert f"| {row} | 1 |" in table
    assert "teacher AP" in table
    run = torch.load(out / "fitnet_selected_online-seed0" / "last.pt", map_location="cpu", weights_only=True)["run"]
    assert run["online_selection"]["channel_group"] == 2 and run["stored"] is False
    stored = torch.load(out / "fitnet_stored-seed0" / "last.pt", map_location="cpu", weights_only=True)["run"]
    assert stored["stored"] is True
