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


def test_stored_rows_name_their_store_and_the_best_comparison(tmp_path, monkeypatch):
    import detkd.bench.accuracy as accuracy
    from detkd.bench.accuracy import store_for, stores_by_method
    from detkd.bench.tables import render

    stores = stores_by_method({"*": "s/maps", "gkd": "s/imp"})
    assert (store_for("cwd", stores), store_for("gkd:paper", stores)) == ("s/maps", "s/imp")
    assert stores_by_method("s/one") == {"*": "s/one"} and store_for("x", {}) is None

    def summary(path):  # the store's size without building one (store_summary reads store_info)
        return {
            "path": path,
            "policy": "lowrank",
            "value_dtype": "int4",
            "encoding": {"rank": 16},
            "importance": path == "s/imp",
            **({"budget_kb": 32.0, "level_rank": {"p3": 6, "p4": 5}} if path == "s/maps" else {}),
            **({"levels": ["p3", "p4"]} if path == "s/maps" else {}),
            "bytes_per_view": 3000.0,
            "dense_fp16_bytes_per_view": 87296,
            "ratio_to_dense": 3000 / 87296,
            "projected_coco_bytes_per_view": 178688,
        }

    monkeypatch.setattr(accuracy, "store_summary", summary)
    ckpt = tmp_path / "teacher.pt"
    import torch

    torch.save({"metrics": {"AP": 0.15}}, ckpt)
    rows = [
        Row("student", None, None),
        Row("cwd (online)", "cwd", str(ckpt)),
        Row("gkd (online)", "gkd", str(ckpt)),
        Row("cwd (stored)", "cwd", "s/maps", kind="stored"),
        Row("gkd (stored)", "gkd", "s/imp", kind="stored"),
    ]
    results = {
        "student": [{"AP": 0.05}, {"AP": 0.04}],
        "cwd (online)": [{"AP": 0.10}, {"AP": 0.12}],  # best online: 11.0, spread 2.0
        "gkd (online)": [{"AP": 0.09}, {"AP": 0.09}],
        "cwd (stored)": [{"AP": 0.095}, {"AP": 0.096}],  # 9.55, spread 0.1: 1.45 below, within 2.0
        "gkd (stored)": [{"AP": 0.08}, {"AP": 0.08}],
    }
    p = accuracy_payload(rows, results, recipe="r.yaml", teacher=str(ckpt), store=stores, seeds=[0, 1])
    assert p["stored"]["cwd"]["vs_online"] == -1.45 and p["stored"]["gkd"]["store"]["path"] == "s/imp"
    assert p["best"] == {
        "online": {"method": "cwd", "mean": 11.0, "spread": 2.0},
        "stored": {"method": "cwd", "mean": 9.55, "spread": 0.1},
        "gap": 1.45,
        "within_spread": True,
    }
    results["cwd (online)"] = [{"AP": 0.12}, {"AP": 0.125}]  # 12.25, spread 0.5: the gap 2.7 is not within
    p = accuracy_payload(rows, results, recipe="r.yaml", teacher=str(ckpt), store=stores, seeds=[0, 1])
    assert p["best"]["within_spread"] is False
    write_json(tmp_path / "store.json", p)
    table = render(tmp_path / "store.json")
    assert "| cwd (from the store) | 9.5, 9.6 | 9.6 | 0.1 | +5.0 | yes |" in table
    assert "Store for gkd: lowrank rank 16 int4, with GKD importance maps, 3000 B per image-view = 3.44 %" in table
    assert "Store for cwd: lowrank fitted to 32 KB, ranks p3 6, p4 5, levels p3, p4 only int4, 3000 B" in table
    assert "3.44 % of the dense fp16 maps of those levels (projected" in table
    assert "(projected at COCO scale: 174.5 KB per image-view)" in table
    assert "gap 2.7, not within the larger seed spread" in table
    results["cwd (stored)"] = [{"AP": 0.13}, {"AP": 0.13}]  # 13.0: ahead of the best online (12.25)
    write_json(
        tmp_path / "store.json",
        accuracy_payload(rows, results, recipe="r.yaml", teacher=str(ckpt), store=stores, seeds=[0, 1]),
    )
    assert "best online: cwd 12.2 (spread 0.5); the store is ahead by 0.8." in render(tmp_path / "store.json")


def _teacher_ckpt(path, seed: int, ap: float, lr: float = 0.02):
    import torch

    recipe = {"name": "t", "data": {"sizes": [320]}, "model": {"fpn_channels": 128}}
    recipe["train"] = {"lr": lr, "seed": seed, "out": f"runs/t-s{seed}"}
    torch.save({"metrics": {"AP": ap}, "run": {"kind": "train", "recipe": recipe}}, path)
    return str(path)


def test_teacher_runs_give_the_teacher_row_its_seed_spread(tmp_path):
    from detkd.bench.accuracy import teacher_seed_runs
    from detkd.bench.tables import accuracy_table

    ckpts = [_teacher_ckpt(tmp_path / f"t{s}.pt", s, ap) for s, ap in ((0, 0.45), (1, 0.431), (2, 0.442))]
    runs = teacher_seed_runs(ckpts)
    expected = {"checkpoints": ckpts, "seeds": [0, 1, 2], "ap": [45.0, 43.1, 44.2], "mean": 44.1, "spread": 1.9}
    assert runs == {**expected, "n": 3}
    p = _payload(tmp_path)
    p["teacher"]["runs"] = runs
    table = accuracy_table(p)
    assert "| teacher (its recipe, seeds [0, 1, 2]) | 45.0, 43.1, 44.2 | 44.1 | 1.9 |" in table
    assert table.index("| teacher") < table.index("| student alone")


def test_teacher_runs_of_another_recipe_are_refused(tmp_path):
    from detkd.bench.accuracy import teacher_seed_runs
    from detkd.errors import DetkdError

    a = _teacher_ckpt(tmp_path / "a.pt", 0, 0.45)
    b = _teacher_ckpt(tmp_path / "b.pt", 1, 0.43, lr=0.01)
    with pytest.raises(DetkdError, match="b.pt was trained by another recipe"):
        teacher_seed_runs([a, b])
