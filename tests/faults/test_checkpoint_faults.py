"""Checkpoint faults: a malicious pickle behind every checkpoint argument, checkpoints missing what
detkd needs, and failed saves (disk full, permissions, torch's own writer errors).

Every case asserts what the user sees: the exit code, a message naming the file, nothing run or
left behind.
"""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

import pytest
import torch

import detkd.models.checkpoint as ckpt
from detkd.cli import main
from detkd.errors import DetkdError
from detkd.models.builders import DetectorSpec, build_detector
from detkd.models.checkpoint import load_detector, read_checkpoint, save_checkpoint

SHAPES = ["circle", "square", "triangle", "ring", "cross", "star"]  # the synthetic data set's classes


class CodeOnLoad:
    """Unpickling this calls ``exec``: the marker file appears when the pickle runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _spec() -> DetectorSpec:
    return DetectorSpec(num_classes=len(SHAPES), fpn_channels=16, head_convs=1)


def _genuine(path: Path) -> Path:
    torch.manual_seed(0)
    save_checkpoint(path, build_detector(_spec()), class_names=SHAPES, extra={"epoch": 0})
    return path


def _malicious(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """(checkpoint, marker): the payload alone, or hidden in an otherwise genuine checkpoint."""
    marker = tmp_path / "marker"
    path = tmp_path / f"{kind}.pt"
    if kind == "alone":
        torch.save(CodeOnLoad(marker), path)
    else:
        payload = torch.load(_genuine(tmp_path / "genuine.pt"), weights_only=True)
        payload["metrics"] = {"AP": 0.5, "note": CodeOnLoad(marker)}
        torch.save(payload, path)
    return path, marker


@pytest.mark.parametrize("kind", ["alone", "embedded"])
def test_the_payload_really_runs_code_when_loaded_unsafely(tmp_path, kind):
    # Guards the tests below: were detkd to unpickle unsafely, this payload would write its marker.
    path, marker = _malicious(tmp_path, kind)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


NO_TEACHER_CHECK = "distill: {check_teacher: false}\n"


def _argv(entry: str, path: Path, tmp_path: Path, small_synth: Path, recipe_factory) -> list[str]:
    run = tmp_path / "run"
    recipe = str(recipe_factory(tmp_path, small_synth, run, extra=NO_TEACHER_CHECK))
    if entry == "eval":
        return ["eval", "--checkpoint", str(path), "--data", str(small_synth), "--workers", "0"]
    if entry == "distill-teacher":
        return ["distill", recipe, "method=fitnet", f"teacher={path}", "--no-progress"]
    if entry == "model-checkpoint":
        return ["train", recipe, f"model.checkpoint={path}", "--no-progress"]
    if entry == "train-resume":
        run.mkdir()
        shutil.copy(path, run / "last.pt")
        return ["train", recipe, "--resume", "--no-progress"]
    if entry == "store-build":
        build = ["store", "build", "--teacher", str(path), "--data", str(small_synth), "--size", "64", "--workers", "0"]
        return [*build, "--out", str(tmp_path / "store"), "--no-progress"]
    assert entry == "export"
    return ["export", str(path), "--out", str(tmp_path / "m.ts")]


ENTRIES = ["eval", "distill-teacher", "model-checkpoint", "train-resume", "store-build", "export"]


@pytest.mark.parametrize("kind", ["alone", "embedded"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_malicious_pickle_is_refused_everywhere(recipe_factory, tmp_path, small_synth, capsys, entry, kind):
    path, marker = _malicious(tmp_path, kind)
    argv = _argv(entry, path, tmp_path, small_synth, recipe_factory)
    named = tmp_path / "run" / "last.pt" if entry == "train-resume" else path
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"detkd: error: {named}: refusing to unpickle arbitrary objects" in err
    assert "a reference to exec" in err  # says what it found
    assert not marker.exists()
    assert not (tmp_path / "run" / "best.pt").exists() and not (tmp_path / "m.ts").exists()
    assert not (tmp_path / "store" / "manifest.json").exists()


def test_genuine_checkpoint_loads_with_plain_types_only(tmp_path):
    path = _genuine(tmp_path / "g.pt")
    payload = torch.load(path, weights_only=True)  # torch's own safe loader accepts it as saved
    assert isinstance(payload["spec"], dict) and payload["spec"]["num_classes"] == len(SHAPES)
    detector, _ = load_detector(path)
    assert detector.spec == _spec().to_dict()


def test_old_checkpoint_with_a_pickled_spec_dataclass_still_loads(tmp_path):
    """Before the spec was saved as a dict, checkpoints pickled DetectorSpec: that one class is allowed."""
    payload = torch.load(_genuine(tmp_path / "g.pt"), weights_only=True)
    payload["spec"] = _spec()
    torch.save(payload, tmp_path / "old.pt")
    detector, loaded = load_detector(tmp_path / "old.pt")
    assert loaded["spec"] == _spec().to_dict()
    for k, v in detector.model.state_dict().items():
        assert torch.equal(v, payload["model"][k])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.pop("spec"), "detkd checkpoint without 'spec'"),
        (lambda p: p.update(spec=[1, 2]), "checkpoint 'spec' is a list, expected a mapping"),
        (lambda p: p["spec"].update(bogus=1), "invalid detector spec in checkpoint (unknown detector spec keys"),
        (lambda p: p.pop("model"), "detkd checkpoint without model weights"),
        (lambda p: p["model"].update({"head.extra": [1.0]}), "weights do not fit the detector: 'head.extra' is a list"),
    ],
)
def test_checkpoint_missing_what_detkd_needs_names_the_file(tmp_path, small_synth, capsys, damage, message):
    payload = torch.load(_genuine(tmp_path / "g.pt"), weights_only=True)
    damage(payload)
    torch.save(payload, tmp_path / "bad.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "bad.pt"), "--data", str(small_synth), "--workers", "0"]) == 2
    assert f"detkd: error: {tmp_path / 'bad.pt'}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda p: torch.save(torch.zeros(3), p), "not a checkpoint (got Tensor)"),
        (lambda p: p.write_bytes(b"\x80\x02garbage"), "refusing to unpickle arbitrary objects"),
        (lambda p: p.write_bytes(b"PK\x03\x04 truncated zip"), "cannot read checkpoint"),
        (lambda p: p.write_bytes(b""), "cannot read checkpoint"),
    ],
)
def test_files_that_are_not_checkpoints(tmp_path, write, message):
    path = tmp_path / "x.pt"
    write(path)
    with pytest.raises(DetkdError, match="^" + re.escape(f"{path}: {message}")):
        read_checkpoint(path)


def test_resume_from_a_checkpoint_without_full_training_state(recipe_factory, tmp_path, small_synth, capsys):
    run = tmp_path / "run"
    payload = torch.load(_genuine(tmp_path / "g.pt"), weights_only=True)
    payload["train_state"] = {"epoch": 0, "best_ap": 0.1}
    run.mkdir()
    torch.save(payload, run / "last.pt")
    assert (
        main(
            [
                "train",
                str(recipe_factory(tmp_path, small_synth, run, extra=NO_TEACHER_CHECK)),
                "--resume",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"{run / 'last.pt'}: training state lacks history, optimizer, scheduler" in err


# -- saving ------------------------------------------------------------------------------------------


def _partial_then(error: BaseException):
    """A torch.save that writes part of the file, then fails as the disk would."""

    def fake_save(obj, f, *args, **kwargs):
        f.write(b"x" * 4096)
        raise error

    return fake_save


def test_disk_full_during_save_keeps_the_old_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = _genuine(tmp_path / "last.pt")
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _partial_then(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError) as exc:
        save_checkpoint(path, build_detector(_spec()), class_names=SHAPES)
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_real_enospc_from_the_kernel_travels_through_torch(tmp_path, monkeypatch):
    """/dev/full fails every write with ENOSPC: torch.save on a file object must not mask the errno."""
    real_open = open
    tmp = tmp_path / "last.pt.tmp"

    def open_full(file, mode="r", *args, **kwargs):
        if Path(file) == tmp:
            tmp.write_bytes(b"partial")  # the temp file exists, as it would on a full disk
            return real_open("/dev/full", mode, *args, **kwargs)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(ckpt, "open", open_full, raising=False)
    with pytest.raises(OSError) as exc:
        save_checkpoint(tmp_path / "last.pt", build_detector(_spec()), class_names=SHAPES)
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("disk_full", [True, False])
def test_torch_runtime_error_on_write(tmp_path, monkeypatch, disk_full):
    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch, "save", _partial_then(error))
    free = 0 if disk_full else 10 << 30
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(20 << 30, 20 << 30, free))
    expected = OSError if disk_full else DetkdError
    with pytest.raises(expected) as exc:
        save_checkpoint(tmp_path / "last.pt", build_detector(_spec()), class_names=SHAPES)
    if disk_full:
        assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(tmp_path / "last.pt")
    else:
        assert str(exc.value).startswith(f"{tmp_path / 'last.pt'}: cannot write checkpoint (")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_training_says_so_naming_the_checkpoint(
    recipe_factory, tmp_path, small_synth, capsys, monkeypatch
):
    run = tmp_path / "run"
    monkeypatch.setattr(torch, "save", _partial_then(OSError(errno.ENOSPC, "No space left on device")))
    assert (
        main(["train", str(recipe_factory(tmp_path, small_synth, run, extra=NO_TEACHER_CHECK)), "--no-progress"]) == 2
    )
    err = capsys.readouterr().err
    assert f"detkd: error: {run / 'best.pt'}: no space left on device\n" in err
    assert "Traceback" not in err
    assert not list(run.glob("*.pt")) and not list(run.glob("*.tmp"))


@pytest.mark.parametrize(
    "code, text",
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EDQUOT, "disk quota exceeded"),
        (errno.EACCES, "permission denied"),
        (errno.EROFS, "read-only file system"),
    ],
)
def test_cli_reports_disk_and_permission_errors_in_one_line(tmp_path, capsys, monkeypatch, code, text):
    import detkd.commands.train as train_cmd

    def fail(args):
        raise OSError(code, "whatever the C library says", str(tmp_path / "out" / "last.pt"))

    monkeypatch.setattr(train_cmd, "run_train", fail)
    assert main(["train", "r.yaml"]) == 2
    assert capsys.readouterr().err == f"detkd: error: {tmp_path / 'out' / 'last.pt'}: {text}\n"


def test_permission_denied_on_the_temp_file(tmp_path, capsys, monkeypatch):
    # Root ignores file modes, so the refusal is simulated where the file is opened.
    def deny(file, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(file))

    monkeypatch.setattr(ckpt, "open", deny, raising=False)
    with pytest.raises(PermissionError) as exc:
        save_checkpoint(tmp_path / "best.pt", build_detector(_spec()), class_names=SHAPES)
    assert exc.value.filename == str(tmp_path / "best.pt")
    assert list(tmp_path.iterdir()) == []


def test_other_os_errors_are_not_disguised(monkeypatch):
    import detkd.commands.train as train_cmd

    def fail(args):
        raise OSError(errno.EIO, "Input/output error", "/somewhere")

    monkeypatch.setattr(train_cmd, "run_train", fail)
    with pytest.raises(OSError, match="Input/output error"):
        main(["train", "r.yaml"])


def test_stale_temp_files_are_removed_by_the_next_save(tmp_path):
    (tmp_path / "last.pt.tmp").write_bytes(b"x" * 1000)  # left by a kill -9 mid-save
    (tmp_path / "best.pt.tmp").write_bytes(b"x" * 1000)
    (tmp_path / "notes.tmp").write_text("not ours")
    _genuine(tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.tmp"]
