"""``detkd bench gpu``: the pass/fail logic on synthetic numbers, and the ``--cpu`` dry run end to end
(every part present, strict JSON, each check carrying its numbers and a verdict consistent with them).
The dry run is the whole GPU script at a toy scale: about 40 s on two idle cores."""

import json
import math

import pytest

from detkd.bench.gpu import TARGETS, judge, part_passed, run_gpu_check, speed_checks
from detkd.bench.results import write_json
from detkd.jsonio import finite_or_none as strict


def _strict_load(path):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _speed_results(student=1.0, online=1.5, stored=1.02, build=0.95, peaks=(2_000, 1_800)):
    return {
        "step_seconds_median": {"student": student, "online": online, "stored": stored},
        "stored_over_student_step_ratio": stored / student,
        "build_over_teacher_inference_throughput_ratio": build,
        "peak_memory_bytes": None if peaks is None else {"student": 1_700, "online": peaks[0], "stored": peaks[1]},
    }


def test_judge_and_verdicts_on_synthetic_numbers():
    assert judge(1.05, "<=", 1.05) is True and judge(1.06, "<=", 1.05) is False
    assert judge(1.3, ">=", 1.3) is True and judge(1.29, ">=", 1.3) is False
    assert judge(None, ">=", 1.3) is None and judge(math.nan, "<=", 1.05) is False
    good = speed_checks(_speed_results())
    assert set(good) == set(TARGETS) and all(c["passed"] for c in good.values()) and part_passed(good)
    assert good["online_over_stored_step_ratio"]["value"] == pytest.approx(1.5 / 1.02)
    # Each target on its own can fail the part.
    for bad, key in (
        (dict(stored=1.10), "stored_over_student_step_ratio"),
        (dict(online=1.2), "online_over_stored_step_ratio"),
        (dict(build=0.8), "build_over_teacher_inference_throughput_ratio"),
        (dict(peaks=(2_000, 2_100)), "stored_over_online_peak_memory_ratio"),
    ):
        checks = speed_checks(_speed_results(**bad))
        assert checks[key]["passed"] is False and not part_passed(checks), key
    # Unmeasured memory (off CUDA) is neither pass nor fail; nothing measured is no pass.
    cpu = speed_checks(_speed_results(peaks=None))
    assert cpu["stored_over_online_peak_memory_ratio"]["passed"] is None and part_passed(cpu)
    assert not part_passed({"a": {"passed": None}})


def test_report_is_strict_json(tmp_path):
    write_json(tmp_path / "r.json", {"x": math.nan, "y": [math.inf, 1.5], "z": (1, 2)})
    assert _strict_load(tmp_path / "r.json") == {"x": None, "y": [None, 1.5], "z": [1, 2]}
    assert strict({"a": {"b": -math.inf}}) == {"a": {"b": None}}


def test_cpu_dry_run_writes_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    report = run_gpu_check(out_json=out, work_dir=tmp_path / "work", cpu=True)
    data = _strict_load(out)
    assert data["mode"] == "cpu" and set(data["parts"]) == {"amp", "torchrun", "speed"}
    env = data["environment"]
    for key in ("device", "torch", "cuda", "date", "commit", "gpu_memory_bytes"):
        assert key in env
    for name, part in data["parts"].items():
        assert isinstance(part["passed"], bool) and "error" not in part, (name, part.get("error"))
        assert part["seconds"] > 0
    assert data["passed"] == all(p["passed"] for p in data["parts"].values()) == report["passed"]

    amp = data["parts"]["amp"]
    assert amp["passed"], amp["checks"]  # the scaler path runs on the CPU too (float16 autocast)
    assert set(amp["checks"]) == {"finite", "close", "resume"}
    assert amp["checks"]["resume"]["checkpoint_scale"] is not None and amp["checks"]["resume"]["scales_equal"]
    assert len(amp["losses"]["amp"]) == len(amp["losses"]["fp32"]) == amp["setup"]["steps"] > 0

    torchrun = data["parts"]["torchrun"]
    assert torchrun["backend"] == "gloo" and torchrun["passed"]
    for mode in ("stored", "online"):
        run = torchrun["runs"][mode]
        assert run["returncode"] == 0 and run["backend_seen"] and run["images_per_second"] > 0

    speed = data["parts"]["speed"]
    assert set(speed["methods"]) == {"fitnet", "defeat"}
    for method, m in speed["methods"].items():
        assert m["results"]["scale"]["method"] == method
        assert set(m["checks"]) == set(TARGETS)
        for key, c in m["checks"].items():
            assert c["target"] == TARGETS[key][1] and c["op"] == TARGETS[key][0]
            assert c["passed"] is judge(c["value"], c["op"], c["target"]), (method, key)
        assert m["checks"]["stored_over_online_peak_memory_ratio"]["value"] is None  # no CUDA memory on the CPU
        assert m["passed"] == part_passed(m["checks"])
    # map methods read the compact lowrank store
    assert speed["methods"]["defeat"]["results"]["scale"]["store_policy"]["name"] == "lowrank"
