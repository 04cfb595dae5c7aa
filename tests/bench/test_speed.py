"""``detkd bench speed`` at a toy scale: every figure the issue names is present, finite and
consistent with the store it measured (the numbers themselves belong in README, not tests)."""

import json
import logging
import math
import statistics

from detkd.bench.speed import SpeedScale, format_results, run_speed, write_results
from detkd.models.builders import DetectorSpec
from detkd.store.verify import store_info


def test_run_speed_reports_every_ratio(tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="detkd")
    student = DetectorSpec(family="fcos", backbone="resnet18", num_classes=6, fpn_channels=16, head_convs=1)
    teacher = DetectorSpec(family="fcos", backbone="resnet18", num_classes=6, fpn_channels=32, head_convs=1)
    scale = SpeedScale(images=16, size=64, batch_size=4, rounds=2, steps_per_round=1, student=student, teacher=teacher)
    r = run_speed(out_dir=tmp_path / "bench", scale=scale, workers=0)
    # Progress throughout: a line as each phase starts, a bar over the rounds of the long ones.
    assert [m.split(":")[0] for m in caplog.messages if m.startswith("bench speed [")] == [
        f"bench speed [{i}/4]" for i in range(1, 5)
    ]
    bars = capsys.readouterr().err
    assert "inference / build rounds" in bars and "step-time rounds" in bars

    for key in (
        "stored_over_student_step_ratio",
        "online_over_student_step_ratio",
        "stored_over_online_step_ratio",
        "nmsksd_over_dense_size_ratio",
        "build_over_teacher_inference_throughput_ratio",
        "build_call_over_teacher_inference_throughput_ratio",
        "build_over_teacher_compute_throughput_ratio",
        "reader_over_training_consumption_ratio",
    ):
        assert math.isfinite(r[key]) and r[key] > 0, key
    med = r["step_seconds_median"]
    assert math.isclose(r["stored_over_student_step_ratio"], med["stored"] / med["student"])
    assert all(len(v) == scale.rounds * scale.steps_per_round for v in r["step_seconds_all"].values())
    # The size figures are the store's own: 16 images x 2 flips, bytes / dense fp16 bytes.
    info = store_info(tmp_path / "bench" / "store")
    assert info["records"] == 32
    assert r["nmsksd_over_dense_size_ratio"] == info["ratio_to_dense"] < 1
    assert r["store_bytes_per_image_view"] == info["bytes_per_image_view"]
    # Throughput ratios are medians of per-round ratios, each round inference then a fresh build.
    rounds = r["throughput_rounds_image_views_per_s"]
    assert all(len(v) == scale.rounds for v in rounds.values())
    per_round = [b / i for b, i in zip(rounds["build"], rounds["inference"], strict=True)]
    assert math.isclose(r["build_over_teacher_inference_throughput_ratio"], statistics.median(per_round))
    # The whole call includes checkpoint loading and setup, so it is never faster than its loop.
    assert r["store_build_call_image_views_per_s"] <= r["store_build_image_views_per_s"]

    text = format_results(r)
    assert "stored / student" in text and "goal >= 0.9" in text
    write_results(r, tmp_path / "speed.json")
    keys = json.loads((tmp_path / "speed.json").read_text())
    assert any("stored" in k and "ratio" in k for k in keys) and any("size" in k and "ratio" in k for k in keys)


def test_method_is_honoured_and_gets_a_store_it_can_read(spec_factory):
    from detkd.bench.speed import _make_task, store_policy_for
    from detkd.models.builders import build_detector

    scale = SpeedScale(8, 64, 2, 1, 1, spec_factory("fcos"), spec_factory("fcos", fpn_channels=32))
    teacher = build_detector(scale.teacher)
    for method in ("fitnet", "cwd", "defeat"):
        task = _make_task("online", scale, teacher, None, method)
        assert list(task.methods) == [method]
    assert store_policy_for("fitnet").name == "nms-ksd" and store_policy_for("pkd").name == "nms-ksd"
    dense = store_policy_for("defeat")
    assert dense.name == "dense" and dense.channel_group == 1 and dense.value_dtype == "float16"
