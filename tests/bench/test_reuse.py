"""``detkd bench accuracy --reuse`` (earlier rows only from a comparable results file) and ``--only``."""

import json

import pytest

from detkd.bench import accuracy
from detkd.bench.accuracy import run_accuracy
from detkd.bench.reuse import ReuseError, reused_results
from detkd.models.files import file_sha256

COMMAND = (
    "detkd bench accuracy --recipe configs/s.yaml --teacher /x/t.pt --methods cwd defeat --seeds 0 1 2 "
    "--out runs/b --json r.json data.root=/d train.epochs=6"
)


def source_file(tmp_path, *, teacher_ap=25.0, sha256=None, command=COMMAND, **fields):
    src = {
        "command": command,
        "recipe": "configs/s.yaml",
        "commit": "abc123",
        "date": "2026-12-02T17:15:20Z",
        "machine": "m",
        "seeds": [0, 1, 2],
        "teacher": {"checkpoint": "/x/t.pt", "ap": teacher_ap, **({"sha256": sha256} if sha256 else {})},
        "student": {"ap": [5.5, 5.0, 4.6], "mean": 5.03, "spread": 0.9, "epoch_seconds": 60.0},
        "methods": {
            "defeat": {
                "ap": [12.3, None, 12.6],
                "epoch_seconds": 42.0,
                "weights": [{"defeat": 1}, None, {"defeat": 2}],
            },
        },
    }
    src.update(fields)
    path = tmp_path / "src.json"
    path.write_text(json.dumps(src))
    return path


@pytest.fixture
def teacher(tmp_path, checkpoint_factory):
    return checkpoint_factory(tmp_path / "t.pt", ["a", "b"], extra={"metrics": {"AP": 0.25}})


def reuse(path, teacher, **kw):
    args = dict(recipe="configs/s.yaml", teacher=teacher, seeds=[2, 0], overrides=["train.epochs=6", "data.root=/d"])
    args.update(kw)
    return reused_results(path, methods=["defeat", "cwd"], **args)


def test_rows_of_the_requested_seeds_in_order(tmp_path, teacher):
    results, source = reuse(source_file(tmp_path), teacher)
    assert sorted(results) == ["defeat (online)", "student"]  # cwd is not in the file: it will be trained
    assert [r["AP"] for r in results["student"]] == pytest.approx([0.046, 0.055])
    assert results["defeat (online)"][0]["distill_weights"] == {"defeat": 2}
    assert results["defeat (online)"][0]["epoch_seconds"] == 42.0
    assert source["commit"] == "abc123" and source["command"] == COMMAND and source["rows"] == sorted(results)
    failed = reuse(source_file(tmp_path), teacher, seeds=[1])[0]["defeat (online)"]
    assert "error" in failed[0] and "AP" not in failed[0]  # a seed that failed there stays failed


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(recipe="configs/other.yaml"), "measured with recipe configs/s.yaml"),
        (dict(overrides=["train.epochs=8", "data.root=/d"]), "measured with overrides"),
        (dict(seeds=[0, 3]), "not [3]"),
    ],
)
def test_refuses_another_benchmark(tmp_path, teacher, change, message):
    with pytest.raises(ReuseError, match=message.replace("[", r"\[").replace("]", r"\]")):
        reuse(source_file(tmp_path), teacher, **change)


def test_teacher_matched_by_sha256_else_by_ap(tmp_path, teacher, caplog):
    reuse(source_file(tmp_path, sha256=file_sha256(teacher)), teacher)
    with pytest.raises(ReuseError, match="another teacher"):
        reuse(source_file(tmp_path, sha256="0" * 64), teacher)
    with pytest.raises(ReuseError, match="not the same teacher"):
        reuse(source_file(tmp_path, teacher_ap=24.99), teacher)
    reuse(source_file(tmp_path), teacher)  # AP 25.0 recorded both sides, no sha256 there
    assert "matched by its AP" in caplog.text


def test_overrides_recorded_or_read_back_from_the_command(tmp_path, teacher):
    with_store = COMMAND.replace("--methods", "--store gkd=stores/imp --methods")  # METHOD=DIR is no override
    reuse(source_file(tmp_path, command=with_store), teacher)
    recorded = source_file(tmp_path, command="detkd bench accuracy ...", overrides=["train.epochs=6", "data.root=/d"])
    reuse(recorded, teacher)
    with pytest.raises(ReuseError, match="measured with overrides"):
        reuse(source_file(tmp_path, overrides=["train.epochs=7"]), teacher)


def test_distill_overrides_reuse_the_student_row_alone(tmp_path, teacher):
    # distill.levels changes what distillation does, not the student alone: the online rows must be trained
    p3 = ["train.epochs=6", "data.root=/d", "distill.levels=[p3]"]
    results, source = reuse(source_file(tmp_path), teacher, overrides=p3)
    assert sorted(results) == ["student"] == source["rows"]
    assert [r["AP"] for r in results["student"]] == pytest.approx([0.046, 0.055])
    with pytest.raises(ReuseError, match="measured with overrides"):
        reuse(source_file(tmp_path), teacher, overrides=["train.epochs=7", "data.root=/d", "distill.levels=[p3]"])


def test_refuses_a_file_that_is_not_an_accuracy_benchmark(tmp_path, teacher):
    (tmp_path / "x.json").write_text(json.dumps({"step_seconds_median": {}}))
    with pytest.raises(ReuseError, match="not a `detkd bench accuracy` results file"):
        reuse(tmp_path / "x.json", teacher)


def test_run_accuracy_trains_only_the_rows_not_reused(tmp_path, teacher, monkeypatch):
    trained = []

    def fake_run(row, *, seed, **kwargs):
        trained.append((row.name, seed))
        return {"AP": 0.07 + seed / 1000, "epoch_seconds": 1.0}

    monkeypatch.setattr(accuracy, "run_row", fake_run)
    out_json = tmp_path / "new.json"
    run_accuracy(
        recipe="configs/s.yaml",
        teacher=str(teacher),
        store=None,
        methods=["defeat", "cwd"],
        seeds=[0, 2],
        out_dir=tmp_path / "out",
        overrides=["data.root=/d", "train.epochs=6"],
        json_path=out_json,
        reuse=source_file(tmp_path),
    )
    assert trained == [("cwd (online)", 0), ("cwd (online)", 2)]
    payload = json.loads(out_json.read_text())
    assert payload["student"]["ap"] == [5.5, 4.6] and payload["methods"]["defeat"]["ap"] == [12.3, 12.6]
    assert payload["methods"]["cwd"]["ap"] == [7.0, 7.2]
    assert payload["reused"]["rows"] == ["defeat (online)", "student"] and payload["reused"]["commit"] == "abc123"
    assert payload["teacher"]["sha256"] == file_sha256(teacher) and payload["teacher"]["ap"] == 25.0
    assert payload["overrides"] == ["data.root=/d", "train.epochs=6"]  # what a later --reuse compares


def test_only_trains_the_named_row_kinds(tmp_path, monkeypatch):
    trained = []

    def fake_run(row, *, seed, out_dir, **kwargs):  # like run_row: a finished run is read, not trained
        run = accuracy.run_dir_for(row, seed, out_dir)
        if accuracy.finished_run(run) is not None:
            return accuracy.finished_run(run)
        trained.append((row.name, seed))
        run.mkdir(parents=True)
        last = {"AP": 0.05 + len(trained) / 100, "epoch_seconds": 1.0}
        (run / "metrics.json").write_text(json.dumps({"last": last}))
        return last

    monkeypatch.setattr(accuracy, "run_row", fake_run)
    monkeypatch.setattr(accuracy, "store_summary", lambda path: {"path": path})
    args = dict(recipe="r.yaml", teacher="t.pt", store="s", seeds=[0], out_dir=tmp_path / "o")
    with pytest.raises(Exception, match="no finished student run"):
        run_accuracy(**args, methods=["cwd"], only=["stored"], json_path=tmp_path / "x.json")
    run_accuracy(**args, methods=["cwd"], only=["student"])
    run_accuracy(**args, methods=["cwd", "mgd"], only=["online"])
    assert trained == [("cwd (stored)", 0), ("student", 0), ("cwd (online)", 0), ("mgd (online)", 0)]
    # A last call trains the mgd stored row and reads the rest; rows never run are left out.
    teacher_identity = ("0" * 64, 25.0)
    monkeypatch.setattr("detkd.bench.reuse.teacher_identity", lambda t: teacher_identity)
    table = run_accuracy(**args, methods=["cwd", "mgd", "fgd"], only=["stored"], json_path=tmp_path / "x.json")
    assert trained[-2:] == [("mgd (stored)", 0), ("fgd (stored)", 0)]
    assert [t["row"] for t in table] == [
        "student",
        "cwd (online)",
        "mgd (online)",
        "cwd (stored)",
        "mgd (stored)",
        "fgd (stored)",
    ]
    payload = json.loads((tmp_path / "x.json").read_text())
    assert sorted(payload["methods"]) == ["cwd", "mgd"] and sorted(payload["stored"]) == ["cwd", "fgd", "mgd"]
    assert payload["student"]["ap"] == [7.0] and payload["stored"]["cwd"]["ap"] == [6.0]
