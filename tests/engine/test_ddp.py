"""torchrun with 2 CPU processes (gloo): the same command trains and distills under DDP."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from detkd.cli import main


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
    reason="torchrun not installed",
)
def test_torchrun_two_processes_distill(tmp_path, synth, recipe_factory, done_lines):
    recipe = recipe_factory(tmp_path, synth, tmp_path / "teacher")  # batch 2
    assert main(["train", str(recipe), "--no-progress"]) == 0
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    student = tmp_path / "student"
    cmd = [
        torchrun,
        "--nproc-per-node",
        "2",
        "-m",
        "detkd",
        "distill",
        str(recipe),
        "method=fitnet",
        f"teacher={tmp_path / 'teacher' / 'last.pt'}",
        f"train.out={student}",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((student / "metrics.json").read_text())["last"]
    # 8 images over 2 ranks x batch 2 = 2 steps per rank in the epoch; rank 0 evaluates the 4 val images.
    assert (saved["epoch"], saved["step"], saved["num_images"]) == (1, 2, 4)
    assert saved["images_per_second"] > 0 and math.isfinite(saved["AP"]) and 0.0 <= saved["AP"] <= 1.0
    # The method's weight by the default rule, reported under the method's name.
    weights = saved["distill_weights"]
    assert list(weights) == ["fitnet"] and weights["fitnet"]["rule"] == "auto"
    assert math.isfinite(weights["fitnet"]["weight"]) and weights["fitnet"]["weight"] > 0
    # Rank 0 reports, rank 1 does not; what it prints is the run's own result.
    [(shown, where)] = done_lines(proc.stdout)
    assert where == str(student) and set(shown) == {"AP", "AP50", "AP75", "voc_map50"}
    for key, value in shown.items():
        assert value == pytest.approx(100 * saved[key], abs=0.05 + 1e-9), key
    assert proc.stdout.count("stored teacher: False") == 1
