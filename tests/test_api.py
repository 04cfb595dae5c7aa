"""The Python API end to end, as README shows it (load_recipe -> train -> evaluate_checkpoint -> distill),
and a distillation run interrupted after its first epoch, then resumed, ending exactly where an
uninterrupted run ends."""

from __future__ import annotations

import hashlib
import json
import math

import torch

from detkd import api
from detkd.cli import main

TIMINGS = ("epoch_seconds", "images_per_second")  # the only figures two identical runs may differ in
SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl", "voc_map50", "num_images", "num_detections")


def _as_json(value):
    """What the JSON files hold for ``value``: undefined metrics (NaN) as null."""
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _summary(metrics: dict) -> dict:
    """The evaluation numbers of an EvalResult dict or of a run's metrics."""
    return _as_json({k: metrics[k] for k in (*SUMMARY, "per_class_ap")})


def _differing(a, b) -> list[str]:
    """The weights of two detectors that are not bit-identical (a missing one counts)."""
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sorted(k for k in sa.keys() | sb.keys() if k not in sa or k not in sb or not torch.equal(sa[k], sb[k]))


def test_train_evaluate_and_distill_through_the_api(tmp_path, synth, recipe_factory, capsys):
    teacher_run = tmp_path / "teacher"
    path = recipe_factory(tmp_path, synth, teacher_run, batch_size=4, train_keys="device: cpu")
    recipe = api.load_recipe(path)
    assert (recipe.train.out, recipe.data.sizes, recipe.train.epochs) == (str(teacher_run), [64], 1)
    trained = api.train(recipe, progress=False)
    ckpt = teacher_run / "last.pt"
    assert trained["epoch"] == 1 and ckpt.is_file()

    # The checkpoint evaluated on its own: at the size it was trained at (64 px, from its recipe), the
    # numbers the run's own final evaluation of the same weights reported.
    result = api.evaluate_checkpoint(ckpt, synth, device="cpu")
    assert result.num_images == 4 and result.num_detections > 0
    assert _summary(result.to_dict()) == _summary(trained)
    # ... which tells sizes apart: at 128 px the same weights give other numbers.
    assert _summary(api.evaluate_checkpoint(ckpt, synth, size=128, device="cpu").to_dict()) != _summary(trained)

    # `detkd eval` on the same checkpoint and data writes and prints those numbers.
    capsys.readouterr()
    written = tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", str(ckpt), "--data", str(synth), "--workers", "0", "--device", "cpu"]
    assert main([*argv, "--json", str(written)]) == 0
    assert json.loads(written.read_text()) == _as_json(result.to_dict())
    printed = capsys.readouterr().out
    assert f"images 4, detections {result.num_detections}" in printed and f"metrics written to {written}" in printed

    # Distillation from that checkpoint as the teacher, the method's weight by the default rule (auto).
    student_run = tmp_path / "student"
    overrides = [f"train.out={student_run}", f"distill.teacher={ckpt}", "distill.methods=[{name: fitnet}]"]
    distilled = api.distill(api.load_recipe(path, [*overrides, "distill.calibration_steps=1"]), progress=False)
    assert distilled["stored"] is False and distilled["epoch"] == 1 and math.isfinite(distilled["AP"])
    report = distilled["distill_weights"]
    assert list(report) == ["fitnet"] and report["fitnet"]["rule"] == "auto" and report["fitnet"]["frozen"]
    assert math.isfinite(report["fitnet"]["weight"]) and report["fitnet"]["weight"] > 0
    saved = json.loads((student_run / "metrics.json").read_text())["last"]
    assert saved["distill_weights"] == report and _summary(saved) == _summary(distilled)
    # The student checkpoint says whom it learned from (this very file), and evaluates like any other.
    student, payload = api.load_detector(student_run / "last.pt")
    run = payload["run"]
    assert run["kind"] == "distill" and [m["name"] for m in run["methods"]] == ["fitnet"]
    assert run["teacher_hash"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert run["teacher_ap"] == result.AP  # the teacher check evaluated the same weights on the same split
    assert _summary(api.evaluate_checkpoint(student_run / "last.pt", synth, device="cpu").to_dict()) == _summary(
        distilled
    )
    teacher, _ = api.load_detector(ckpt)
    assert _differing(student, teacher)  # it trained


def test_distill_resumed_after_its_first_epoch_ends_where_an_uninterrupted_run_does(
    tmp_path, small_synth, recipe_factory, checkpoint_factory
):
    names = api.open_source(small_synth, format="coco", split="train").class_names
    teacher = checkpoint_factory(tmp_path / "teacher.pt", names, seed=1, fpn_channels=32)
    # 4 images, batch 2: two steps per epoch. The method's weight is `auto` (the default rule),
    # calibrated over the two steps of epoch 1 and then frozen: the resumed epoch 2 must replay the
    # frozen weight, not calibrate afresh. Flips are on: the views must replay too.
    path = recipe_factory(tmp_path, small_synth, tmp_path / "unused", epochs=2, train_keys="device: cpu")

    def distill(out, **kw) -> dict:
        overrides = [f"train.out={out}", f"distill.teacher={teacher}", "distill.methods=[{name: mgd}]"]
        overrides += ["distill.calibration_steps=2", "distill.check_teacher=false"]
        return api.distill(api.load_recipe(path, overrides), progress=False, **kw)

    full = distill(tmp_path / "full")
    first = distill(tmp_path / "part", stop_after=0)  # "killed" once its first epoch's checkpoint is saved
    after_first, _ = api.load_detector(tmp_path / "part" / "last.pt")
    resumed = distill(tmp_path / "part", resume=True)

    assert first["epoch"] == 1 and resumed["epoch"] == full["epoch"] == 2
    weight = full["distill_weights"]["mgd"]
    assert weight["rule"] == "auto" and weight["frozen"] and weight["calibration_steps"] == 2
    assert first["distill_weights"] == resumed["distill_weights"] == full["distill_weights"]

    a, _ = api.load_detector(tmp_path / "full" / "last.pt")
    b, payload = api.load_detector(tmp_path / "part" / "last.pt")
    assert payload["epoch"] == 2
    assert _differing(a, b) == []  # bit-exact, not merely close
    assert _differing(after_first, b)  # the resumed run did train its second epoch

    def without_timings(m: dict) -> dict:
        return _as_json({k: v for k, v in m.items() if k not in TIMINGS})

    assert without_timings(resumed) == without_timings(full)
    files = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("full", "part")]
    assert [without_timings(h) for h in files[1]["history"]] == [without_timings(h) for h in files[0]["history"]]
    assert [h["epoch"] for h in files[1]["history"]] == [1, 2]
