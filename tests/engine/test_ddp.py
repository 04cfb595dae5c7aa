"""torchrun with 2 CPU processes (gloo): the same command trains and distills under DDP."""

import json
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
def test_torchrun_two_processes_distill(tmp_path):
    data = tmp_path / "shapes"
    assert main(["data", "synth", "--out", str(data), "--train", "8", "--val", "4", "--size", "64"]) == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"data: {{root: {data}, sizes: [64], batch_size: 2, workers: 0}}\n"
        "model: {family: fcos, fpn_channels: 16, head_convs: 1}\n"
        f"train: {{epochs: 1, warmup_iters: 1, out: {tmp_path / 'teacher'}}}\n"
    )
    assert main(["train", str(recipe), "--no-progress"]) == 0
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
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
        f"train.out={tmp_path / 'student'}",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("done: AP") == 1  # rank 0 reports, rank 1 does not
    metrics = json.loads((tmp_path / "student" / "metrics.json").read_text())["last"]
    # 8 images over 2 ranks x batch 2 = 2 steps per rank per epoch
    assert metrics["images_per_second"] > 0 and "AP" in metrics
