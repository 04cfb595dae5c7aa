"""``detkd bench speed`` at a toy scale: every figure the issue names is present and finite, each ratio
and median is the one of the recorded measurements it names, the store figures match the store the
teacher's shapes imply, and the method recorded is the method measured (the numbers themselves
belong in README, not tests)."""

import logging
import math
import statistics
from collections import Counter

import pytest

from detkd import api
from detkd.bench.speed import SpeedScale, format_results, run_speed, store_policy_for, write_results
from detkd.errors import ConfigError

RATIOS = (
    "stored_over_student_step_ratio",
    "online_over_student_step_ratio",
    "stored_over_online_step_ratio",
    "method_over_student_compute_ratio",
    "store_over_dense_size_ratio",
    "build_over_teacher_inference_throughput_ratio",
    "build_call_over_teacher_inference_throughput_ratio",
    "build_over_teacher_compute_throughput_ratio",
    "reader_over_training_consumption_ratio",
)


def _counted(name: str, forward, calls: Counter):
    def counting(self, *args, **kwargs):
        calls[name] += 1
        return forward(self, *args, **kwargs)

    return counting


def test_run_speed_figures_follow_from_its_measurements(tmp_path, caplog, capsys, monkeypatch, strict_json):
    caplog.set_level(logging.INFO, logger="detkd")
    # Every forward pass of PKD (the method asked for) and FitNet (the bench's default) is counted.
    calls: Counter = Counter()
    for name in ("pkd", "fitnet"):
        cls = api.METHODS.get(name)
        monkeypatch.setattr(cls, "forward", _counted(name, vars(cls)["forward"], calls))
    student = api.DetectorSpec(family="fcos", backbone="resnet18", num_classes=6, fpn_channels=16, head_convs=1)
    teacher = api.DetectorSpec(family="fcos", backbone="resnet18", num_classes=6, fpn_channels=32, head_convs=1)
    # Three rounds: a median of three is not the mean, so a mean reported as a median shows.
    scale = SpeedScale(images=16, size=64, batch_size=4, rounds=3, steps_per_round=1, student=student, teacher=teacher)
    r = run_speed(out_dir=tmp_path / "bench", scale=scale, method="pkd", workers=0)

    # Progress throughout: a line as each phase starts, a bar over the rounds of the long ones.
    assert [m.split(":")[0] for m in caplog.messages if m.startswith("bench speed [")] == [
        f"bench speed [{i}/4]" for i in range(1, 5)
    ]
    bars = capsys.readouterr().err
    assert "inference / build rounds" in bars and "step-time rounds" in bars

    # The method recorded is the one measured: PKD ran in every step of its modes (a warm-up
    # round plus the timed ones, online, stored and stored from batches in memory), FitNet never; the store
    # is the one PKD reads (sparse nms-ksd cells).
    assert calls == {"pkd": 3 * (scale.rounds + 1) * scale.steps_per_round}
    assert r["scale"] == {
        "images": 16,
        "size": 64,
        "batch_size": 4,
        "student": student.to_dict(),
        "teacher": teacher.to_dict(),
        "method": "pkd",
        "store_policy": store_policy_for("pkd").to_dict(),
        "amp": False,
        "device": "cpu",
        "threads": 1,  # tests run on one intra-op thread (conftest)
        "workers": 0,
    }
    assert r["scale"]["store_policy"]["name"] == "nms-ksd"

    for key in RATIOS:
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert r["peak_memory_bytes"] is None  # CUDA only

    # Step times: each mode's median is the median of its recorded steps, each ratio one of medians.
    times, med = r["step_seconds_all"], r["step_seconds_median"]
    assert set(times) == set(med) == {"student", "online", "stored"}
    for mode, steps in times.items():
        assert len(steps) == scale.rounds * scale.steps_per_round and all(t > 0 for t in steps), mode
        assert med[mode] == statistics.median(steps), mode
    assert r["online_over_student_step_ratio"] == pytest.approx(med["online"] / med["student"])
    assert r["stored_over_student_step_ratio"] == pytest.approx(med["stored"] / med["student"])
    assert r["stored_over_online_step_ratio"] == pytest.approx(med["stored"] / med["online"])
    # The method's own work: the same steps on batches in memory, the store's knowledge collated beforehand.
    ctimes, cmed = r["compute_step_seconds_all"], r["compute_step_seconds_median"]
    assert set(ctimes) == set(cmed) == {"student", "stored"}
    assert all(len(v) == scale.rounds * scale.steps_per_round for v in ctimes.values())
    assert cmed == {k: pytest.approx(statistics.median(v)) for k, v in ctimes.items()}
    assert r["method_over_student_compute_ratio"] == pytest.approx(cmed["stored"] / cmed["student"])

    # Throughput: medians of the interleaved rounds; ratios are medians of per-round ratios.
    rounds = r["throughput_rounds_image_views_per_s"]
    assert set(rounds) == {"inference", "compute", "build", "build_call"}
    assert all(len(v) == scale.rounds for v in rounds.values())
    for key, name in (
        ("teacher_inference_image_views_per_s", "inference"),
        ("teacher_compute_image_views_per_s", "compute"),
        ("store_build_image_views_per_s", "build"),
        ("store_build_call_image_views_per_s", "build_call"),
    ):
        assert r[key] == statistics.median(rounds[name]), key
    for key, num, den in (
        ("build_over_teacher_inference_throughput_ratio", "build", "inference"),
        ("build_call_over_teacher_inference_throughput_ratio", "build_call", "inference"),
        ("build_over_teacher_compute_throughput_ratio", "build", "compute"),
    ):
        per_round = [b / i for b, i in zip(rounds[num], rounds[den], strict=True)]
        assert r[key] == pytest.approx(statistics.median(per_round)), key
    # The whole call includes checkpoint loading and setup, so it is never faster than its loop.
    assert all(c <= b for c, b in zip(rounds["build_call"], rounds["build"], strict=True))

    # The reader against what a stored step consumes: a batch per median stored step.
    assert r["training_records_consumed_per_s"] == pytest.approx(scale.batch_size / med["stored"])
    assert r["reader_over_training_consumption_ratio"] == pytest.approx(
        r["reader_records_per_s"] / r["training_records_consumed_per_s"]
    )

    # Size: dense fp16 maps of the teacher (FPN-32, p3-p7 of a 64 px canvas: 8x8, 4x4, 2x2, 1x1, 1x1
    # cells) are 2 bytes x 32 channels x 86 cells per image-view. The store holds 16 images x 2 flips,
    # all of them inside the store's files on disk.
    assert r["dense_fp16_bytes_per_image_view"] == 2 * 32 * (64 + 16 + 4 + 1 + 1)
    assert r["store_over_dense_size_ratio"] == pytest.approx(
        r["store_bytes_per_image_view"] / r["dense_fp16_bytes_per_image_view"]
    )
    assert r["store_over_dense_size_ratio"] < 1
    on_disk = sum(f.stat().st_size for f in (tmp_path / "bench" / "store").rglob("*") if f.is_file())
    assert 0 < 16 * 2 * r["store_bytes_per_image_view"] <= on_disk

    # The report shows the recorded figures, and the JSON file holds them all.
    text = format_results(r)
    assert "method pkd" in text
    assert f"stored / student   {r['stored_over_student_step_ratio']:.3f}   (goal <= 1.05)" in text
    assert f"online / student   {r['online_over_student_step_ratio']:.3f}" in text
    assert f"ratio {r['store_over_dense_size_ratio']:.4f} (goal <= 0.05" in text
    assert f"ratio {r['build_over_teacher_inference_throughput_ratio']:.3f} (goal >= 0.9)" in text
    assert f"knowledge collated beforehand {r['method_over_student_compute_ratio']:.3f}" in text
    write_results(r, tmp_path / "speed.json")
    saved = strict_json((tmp_path / "speed.json").read_text())
    assert saved["scale"] == r["scale"] and saved["step_seconds_all"] == times
    assert all(saved[key] == pytest.approx(r[key]) for key in RATIOS)
    # The README table is rendered from the file: the ratios it shows are the file's.
    from detkd.bench.tables import render

    table = render(tmp_path / "speed.json")
    assert f"**{r['stored_over_student_step_ratio']:.2f}**" in table and "method `pkd`" not in table
    assert "Method `pkd`, store policy `nms-ksd int4`" in table
    assert f"{r['projected_coco']['bytes_per_view'] / 1024:.1f} KB" in table
    assert f"| {r['method_over_student_compute_ratio']:.2f} ({cmed['stored']:.3f} s" in table


def test_each_method_gets_a_store_policy_it_can_read():
    # Position-wise methods read sparse cells: the compact default store (nms-ksd). Every other method
    # needs whole maps: the compact lowrank store (whole maps as rank-16 int4 coefficients).
    sparse = {name for name, cls in api.METHODS.items() if cls.sparse_ok}
    assert {"fitnet", "pkd"} <= sparse and not {"cwd", "defeat", "ssim"} & sparse
    for name in api.METHODS.names():
        policy = store_policy_for(name)
        if name in sparse:
            assert policy.name == "nms-ksd", name
        else:
            assert (policy.name, policy.channel_group, policy.rank, policy.value_dtype) == ("lowrank", 1, 16, "int4")


def test_the_lowrank_store_measured_can_be_chosen():
    policy = store_policy_for("defeat", rank=5, value_dtype="int2")
    assert (policy.name, policy.rank, policy.value_dtype) == ("lowrank", 5, "int2")
    with pytest.raises(ConfigError, match="a rank or budget applies to lowrank stores"):
        store_policy_for("fitnet", rank=5)
    with pytest.raises(ConfigError, match="only lowrank coefficient maps"):
        store_policy_for("fitnet", value_dtype="int2")
    assert store_policy_for("fitnet", value_dtype="int8").value_dtype == "int8"


def test_a_budget_and_levels_choose_the_store_measured():
    policy = store_policy_for("defeat", budget_kb=32, levels=["p3"])
    assert (policy.name, policy.budget_kb, policy.value_dtype, policy.levels) == ("lowrank", 32, "auto", ["p3"])
    with pytest.raises(ConfigError, match="a rank or budget applies to lowrank stores"):
        store_policy_for("fitnet", budget_kb=32)
    with pytest.raises(ConfigError, match="chooses the ranks itself"):
        store_policy_for("defeat", budget_kb=32, rank=4)


def test_online_and_stored_steps_distill_the_levels_the_store_holds(tmp_path, tiny_source, spec_factory):
    from detkd.bench.steps import make_task
    from detkd.models.checkpoint import save_checkpoint
    from detkd.store.reader import StoreReader
    from tests.store.test_build import build

    teacher = api.build_detector(spec_factory("fcos"))
    save_checkpoint(tmp_path / "t.pt", teacher, class_names=tiny_source.class_names)
    build(tmp_path, tiny_source, tmp_path / "t.pt", "s", policy=store_policy_for("defeat", rank=2, levels=["p3"]))
    scale = SpeedScale(8, 64, 2, 1, 1, spec_factory("fcos"), spec_factory("fcos"))
    for mode in ("online", "stored"):
        task = make_task(mode, scale, teacher, StoreReader(tmp_path / "s"), "defeat")
        assert task.levels == ["p3"] and list(task.methods["defeat"].levels) == ["p3"], mode
