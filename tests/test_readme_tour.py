"""README's tour, run top to bottom at tiny scale in a fresh directory: it cannot break unnoticed again.

The commands are read from README itself (the ```bash block under "## A tour"); each gets only
scale-down flags (fewer, smaller images; one epoch; no loader workers), never a changed meaning.
"""

import re
import shlex
import shutil
from pathlib import Path

import pytest

from detkd.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ["train.epochs=1", "data.sizes=[64]", "data.batch_size=4", "data.workers=0", "train.device=cpu"]
TINY = {
    ("data", "synth"): ["--train", "8", "--val", "4", "--size", "64"],
    ("train",): TINY_RECIPE,
    ("distill",): TINY_RECIPE + ["distill.calibration_steps=1"],
    ("eval",): ["--workers", "0", "--device", "cpu"],
    ("store", "build"): ["--workers", "0", "--no-progress", "--device", "cpu"],
}
# `bench speed --quick` measures speed at its own fixed scale (about a minute); tests/bench/test_speed.py runs it.
SKIPPED = [("bench", "speed")]


def tour_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## A tour\n+```bash\n(.*?)```", text, re.S).group(1)
    commands = []
    for line in block.splitlines():
        line = line.split("  #")[0].strip()
        if line:
            argv = shlex.split(line)
            assert argv[0] == "detkd", line
            commands.append(argv[1:])
    return commands


def _tiny(argv: list[str]) -> list[str] | None:
    for key in SKIPPED:
        if tuple(argv[: len(key)]) == key:
            return None
    for key, extra in TINY.items():
        if tuple(argv[: len(key)]) == key:
            return [*argv, *extra]
    return argv


def test_the_readme_tour_runs_top_to_bottom(tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    commands = tour_commands()
    assert len(commands) >= 10 and any(c[:2] == ["store", "build"] for c in commands)
    outs = []
    for argv in commands:
        tiny = _tiny(argv)
        if tiny is None:
            continue
        assert main(tiny) == 0, f"README tour step failed: detkd {' '.join(argv)}\n{capsys.readouterr().err}"
        outs += [a.split("=", 1)[1] for a in argv if a.startswith("train.out=")]
    assert len(outs) == len(set(outs))  # every distilled run has its own directory
    for run in ["runs/shapes-teacher", "runs/shapes-student", *outs]:
        assert (tmp_path / run / "metrics.json").is_file(), run
    exported = list((tmp_path / "runs" / "shapes-cwd-online").glob("*.onnx"))
    assert exported, "the tour's export step wrote nothing"


@pytest.mark.parametrize("argv", [["bench", "speed", "--quick"]])
def test_only_the_speed_bench_is_left_out(argv):
    assert _tiny(argv) is None and all(_tiny(c) is not None or tuple(c[:2]) in SKIPPED for c in tour_commands())
