"""Committed results: strict JSON, the summary arithmetic, README tables generated from the files."""

import json
import math
from pathlib import Path

import pytest

from detkd.bench.accuracy import Row, accuracy_payload
from detkd.bench.results import ap_summary, read_json, write_json
from detkd.bench.tables import update_readme

REPO = Path(__file__).resolve().parents[2]


def test_ap_summary_is_in_points_with_spread_and_failed_seeds_as_null():
    s = ap_summary([0.052, 0.041, None, math.nan])
    assert s == {"ap": [5.2, 4.1, None, None], "mean": 4.65, "spread": 1.1, "n": 2}
    assert ap_summary([0.1]) == {"ap": [10.0], "mean": 10.0, "spread": None, "n": 1}


def test_write_json_is_strict(tmp_path):
    p = write_json(tmp_path / "r.json", {"a": math.nan, "b": [math.inf, 1.0], "c": {"d": -math.inf}})
    assert json.loads(p.read_text()) == {"a": None, "b": [None, 1.0], "c": {"d": None}}
    (tmp_path / "bad.json").write_text('{"a": NaN}')
    with pytest.raises(ValueError, match="strict"):
        read_json(tmp_path / "bad.json")


def _payload(tmp_path):
    ckpt = tmp_path / "teacher.pt"
    import torch

    torch.save({"metrics": {"AP": 0.15}}, ckpt)
    rows = [
        Row("student", None, None),
        Row("cwd (online)", "cwd", str(ckpt)),
        Row("ssim:paper (online)", "ssim:paper", "t"),
    ]
    results = {
        "student": [{"AP": 0.05, "epoch_seconds": 10}, {"AP": 0.04, "epoch_seconds": 12}],
        "cwd (online)": [{"AP": 0.10, "distill_weights": {"cwd": {"rule": "auto", "weight": 0.5}}}, {"AP": 0.11}],
        "ssim:paper (online)": [{"AP": 0.055}, {"error": "diverged"}],
    }
    return accuracy_payload(rows, results, recipe="r.yaml", teacher=str(ckpt), store=None, seeds=[0, 1])


def test_accuracy_payload_schema_and_gain_rule(tmp_path):
    p = _payload(tmp_path)
    assert {"command", "commit", "date", "machine"} <= set(p)
    assert p["teacher"]["ap"] == 15.0
    assert p["student"]["ap"] == [5.0, 4.0] and p["student"]["spread"] == 1.0 and p["student"]["epoch_seconds"] == 11
    cwd = p["methods"]["cwd"]
    assert cwd["ap"] == [10.0, 11.0] and cwd["vs_student"] == 6.0 and cwd["beats_student"] is True
    ssim = p["methods"]["ssim:paper"]
    assert ssim["ap"] == [5.5, None] and ssim["vs_student"] == 1.0 and ssim["beats_student"] is False
    assert ssim["errors"] == ["diverged"]


def test_readme_blocks_are_rendered_from_the_files_and_checked(tmp_path):
    results = tmp_path / "results"
    write_json(results / "x.json", _payload(tmp_path))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results: x.json -->\nold table\n<!-- /results -->\nafter\n")
    assert update_readme(readme, results, check=True) == ["x.json"]
    assert "old table" in readme.read_text()  # --check writes nothing
    assert update_readme(readme, results) == ["x.json"]
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("<!-- /results -->\nafter\n")
    assert "| cwd (online) | 10.0, 11.0 | 10.5 | 1.0 | +6.0 | yes | cwd auto: 0.5 |" in text
    assert "| student alone | 5.0, 4.0 | 4.5 | 1.0 |" in text
    assert update_readme(readme, results, check=True) == []


def test_committed_readme_tables_match_the_committed_results():
    """README's generated tables equal what the committed results files render to."""
    results = REPO / "benchmarks" / "results"
    if not results.is_dir():
        pytest.skip("no committed results yet")
    for path in results.glob("*.json"):
        read_json(path)  # strict JSON
    assert update_readme(REPO / "README.md", results, check=True) == []
