"""``detkd demo``: the quick pipeline end to end (run once per module), the report's AP scale and computed
conclusion (on summaries made up here), the data-scale guard and the separate default folders."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

import detkd.demo.run as demo_run
from detkd.cli import build_parser, main
from detkd.demo import QUICK, DemoScale, conclusion, default_out, format_demo, report_markdown, run_demo
from detkd.demo.scale import prepare_data

HEADER = "AP = COCO AP@[.5:.95] x100 on the validation split"


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "quick"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out, stdout.getvalue()


def _row_line(text: str, label: str) -> str:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"| {label}")]
    return line


def test_quick_demo_runs_every_row_and_counts_teacher_forwards(quick_demo):
    out, _ = quick_demo
    summary = json.loads((out / "demo.json").read_text())
    assert summary["scale"] == QUICK.to_dict() and summary["method"] == "defeat"
    rows = summary["rows"]
    assert set(rows) == {"teacher", "student", "online", "stored"}
    (online,) = rows["online"]["runs"]
    # one teacher forward per training image-view: steps x batch size (drop_last batches of 8)
    assert online["teacher_forwards"] == online["steps"] * 8 == (QUICK.train_images // 8) * 8 * QUICK.student_epochs
    assert rows["student"]["runs"][0]["teacher_forwards"] == 0 == rows["stored"]["runs"][0]["teacher_forwards"]
    assert rows["teacher"]["runs"][0]["teacher_forwards"] is None
    store = summary["store"]
    assert store["policy"] == "lowrank" and store["records"] == 2 * QUICK.train_images  # both flips
    assert store["teacher_forwards"] == store["records"] + store["fit_views"]
    assert 0 < store["ratio_to_dense"] < 0.1 and store["projected_coco"]["bytes_per_view"] > 0
    stored_run = torch.load(Path(rows["stored"]["runs"][0]["dir"]) / "last.pt", weights_only=True)["run"]
    online_run = torch.load(Path(online["dir"]) / "last.pt", weights_only=True)["run"]
    assert stored_run["stored"] is True and online_run["stored"] is False
    assert [m["name"] for m in stored_run["methods"]] == ["defeat"] == [m["name"] for m in online_run["methods"]]


def test_quick_demo_table_and_report_show_ap_x100(quick_demo):
    out, printed = quick_demo
    report = (out / "report.md").read_text()
    summary = json.loads((out / "demo.json").read_text())
    for text in (printed, report):
        assert f"{HEADER} ({QUICK.val_images} images)" in text
        assert "--quick only checks that the pipeline runs" in text
        for row in summary["rows"].values():
            metrics = json.loads((Path(row["runs"][0]["dir"]) / "metrics.json").read_text())["last"]
            cells = [c.strip() for c in _row_line(text, row["label"]).split("|")]
            assert cells[2] == f"{100 * metrics['AP']:.1f}" and cells[3] == f"{100 * metrics['AP50']:.1f}"


def test_quick_demo_writes_report_plot_and_predictions(quick_demo):
    out, printed = quick_demo
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "data" / "scale.json").is_file()
    pictures = sorted((out / "predictions").glob("*.png"))
    assert len(pictures) == demo_run.PREDICTION_IMAGES
    assert "teacher" in (out / "predictions" / "README.txt").read_text()
    for path in ("report.md", "demo.png", "predictions", "store", "stored-defeat-seed0", "online-defeat-seed0"):
        assert str(out / path) in printed


def test_rerun_reuses_finished_runs_and_keeps_their_time(quick_demo):
    out, _ = quick_demo
    before = json.loads((out / "demo.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        again = run_demo(out_dir=out, quick=True, progress=False)
    assert all(r["reused"] for row in again["rows"].values() for r in row["runs"]) and again["store"]["reused"]
    assert again["rows"]["online"]["runs"][0]["seconds"] == before["rows"]["online"]["runs"][0]["seconds"]
    assert "(reused)" in stdout.getvalue()


def test_data_of_another_scale_is_refused(tmp_path, capsys):
    out = tmp_path / "demo"
    prepare_data(out / "data", DemoScale(train_images=4, val_images=2, teacher_epochs=1, student_epochs=1))
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(out / "data") in err and "--out" in err and "delete" in err
    assert '"train_images": 4' in err and f'"train_images": {QUICK.train_images}' in err  # both scales
    assert not (out / "teacher").exists()  # refused before any training


def test_data_without_a_scale_record_is_refused(tmp_path):
    data = tmp_path / "data"
    prepare_data(data, DemoScale(train_images=4, val_images=2, teacher_epochs=1, student_epochs=1))
    (data / "scale.json").unlink()  # as an older demo left it
    with pytest.raises(Exception, match="no scale.json"):
        prepare_data(data, QUICK)


def test_quick_and_full_use_different_default_folders(tmp_path, monkeypatch):
    assert build_parser().parse_args(["demo"]).out is None  # so run_demo picks by --quick
    seen = []

    class Stop(Exception):
        pass

    def stop(data, scale):
        seen.append((data, scale))
        raise Stop  # before any work

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo_run, "prepare_data", stop)
    for quick in (True, False):
        with pytest.raises(Stop):
            run_demo(quick=quick, progress=False)
    (quick_data, quick_scale), (full_data, full_scale) = seen
    assert quick_data == default_out(quick=True) / "data" == Path("runs/demo-quick/data")
    assert full_data == default_out(quick=False) / "data" == Path("runs/demo/data")
    assert quick_scale.train_images < full_scale.train_images


def _run(seed: int, ap: float, *, seconds: float = 100.0, per_epoch: float = 10.0, forwards: int | None = 0) -> dict:
    return {
        "seed": seed,
        "dir": f"runs/x/seed{seed}",
        "AP": ap,
        "AP50": ap + 0.2,
        "seconds": seconds,
        "epoch_seconds": per_epoch,
        "teacher_forwards": forwards,
        "reused": False,
    }


def made_up_summary(*, student: list[float], online: list[float], stored: list[float], quick: bool = False) -> dict:
    seeds = list(range(len(student)))

    def row(label: str, aps: list[float], **kw) -> dict:
        return {"label": label, "runs": [_run(s, a, **kw) for s, a in zip(seeds, aps, strict=True)]}

    return {
        "quick": quick,
        "scale": {**QUICK.to_dict(), "seeds": seeds},
        "method": "defeat",
        "train_images": 600,
        "val_images": 150,
        "rows": {
            "teacher": {"label": "teacher", "runs": [_run(0, 0.5, per_epoch=20.0, forwards=None)]},
            "student": row("student alone", student),
            "online": row("student distilled online (defeat)", online, per_epoch=15.0, forwards=4800),
            "stored": row("student distilled from the store (defeat)", stored, per_epoch=11.0),
        },
        "store": {
            "dir": "runs/x/store",
            "policy": "lowrank",
            "rank": 16,
            "value_dtype": "int4",
            "seconds": 30.0,
            "images": 600,
            "records": 1200,
            "views": ["128", "128f"],
            "teacher_forwards": 1456,
            "fit_views": 256,
            "bytes_per_image_view": 3000.0,
            "ratio_to_dense": 0.034,
            "projected_coco": {"bytes_per_view": 178000, "ratio_to_dense": 0.031},
        },
        "paths": {
            "out": "runs/x",
            "data": "runs/x/data",
            "store": "runs/x/store",
            "runs": {"teacher": ["runs/x/teacher"], "student": [], "online": [], "stored": []},
            "report": "runs/x/report.md",
            "plot": "runs/x/demo.png",
            "summary": "runs/x/demo.json",
            "predictions": "runs/x/predictions",
        },
    }


def test_table_shows_ap_x100_not_fractions():
    s = made_up_summary(student=[0.251], online=[0.302], stored=[0.289])
    for text in (format_demo(s), report_markdown(s)):
        assert f"{HEADER} (150 images)" in text
        assert _row_line(text, "student alone").startswith("| student alone | 25.1 | 45.1 |")
        assert _row_line(text, "teacher").startswith("| teacher | 50.0 | 70.0 |")
        assert "| 4,800 |" in _row_line(text, "student distilled online")
        assert "0.251" not in text


def test_conclusion_says_plainly_when_the_store_is_not_ahead():
    s = made_up_summary(student=[0.30], online=[0.32], stored=[0.28])
    line = conclusion(s)
    assert "distillation from the store: NOT ahead of the student alone (-2.0 AP) at 1.1x its time per epoch" in line
    assert "online distillation: +2.0 AP over the student alone at 1.5x its time per epoch" in line
    assert line in format_demo(s) and line in report_markdown(s)
    assert "--quick" not in format_demo(s)


def test_conclusion_follows_the_numbers_and_the_seed_spread():
    s = made_up_summary(student=[0.30, 0.34], online=[0.33, 0.35], stored=[0.37, 0.39])
    line = conclusion(s)
    assert "distillation from the store: +6.0 AP over the student alone at" in line
    assert "online distillation: +2.0 AP over the student alone (within the seed-to-seed spread, 4.0)" in line
    table = format_demo(s)
    assert "AP per seed (0, 1)" in table and "| 37.0 / 39.0 |" in _row_line(table, "student distilled from the store")
    assert "--quick only checks" in format_demo(made_up_summary(student=[0], online=[0], stored=[0], quick=True))
