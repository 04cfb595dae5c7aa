"""Interrupted-then-resumed training must reach exactly the weights of an uninterrupted run."""

import torch

from detkd.data.loader import ViewedDataset, build_loader
from detkd.data.views import ViewPolicy
from detkd.engine.tasks import DetectionTask
from detkd.engine.trainer import LAST, Trainer
from detkd.models.builders import build_detector
from detkd.models.checkpoint import load_detector


def _trainer(source, spec, out, *, seed=3):
    torch.manual_seed(0)
    det = build_detector(spec)
    policy = ViewPolicy(sizes=(64, 48), flip_prob=0.5)  # multi-scale + flips: views must replay on resume
    loader = build_loader(ViewedDataset(source, policy, train=True, seed=seed), batch_size=2, shuffle=True, seed=seed)
    return Trainer(
        DetectionTask(det),
        train_loader=loader,
        val_loader=None,
        val_source=None,
        class_names=source.class_names,
        out_dir=out,
        epochs=3,
        lr=0.01,
        warmup_iters=2,
        schedule="step",
        milestones=[2],
        seed=seed,
        progress=False,
    )


def test_resume_reaches_same_weights(tmp_path, tiny_source, spec_factory):
    for family in ("fcos", "fasterrcnn"):  # Faster R-CNN also draws random RoI samples every step
        spec = spec_factory(family)
        full = _trainer(tiny_source, spec, tmp_path / f"{family}-full")
        full.fit()

        part = _trainer(tiny_source, spec, tmp_path / f"{family}-part")
        part.fit(stop_after=0)  # "killed" after the first epoch's checkpoint
        after_first = {k: v.clone() for k, v in part.student.model.state_dict().items()}
        resumed = _trainer(tiny_source, spec, tmp_path / f"{family}-part")
        assert resumed.resume() and resumed.start_epoch == 1
        resumed.fit()

        a = full.student.model.state_dict()
        b = resumed.student.model.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        # The resumed run really trained on (two more epochs), and its last.pt holds the final weights.
        assert any(not torch.equal(after_first[k], b[k]) for k in b if b[k].is_floating_point())
        saved, payload = load_detector(tmp_path / f"{family}-part" / LAST)
        assert payload["epoch"] == 3  # epochs done, numbered from 1 as in every log of the run
        for k, v in saved.model.state_dict().items():
            assert torch.equal(v, a[k])


def test_checkpoint_of_0_based_epochs_still_resumes(tmp_path, tiny_source, spec_factory):
    spec = spec_factory("fcos")
    part = _trainer(tiny_source, spec, tmp_path / "run")
    part.fit(stop_after=0)
    payload = torch.load(tmp_path / "run" / LAST, map_location="cpu", weights_only=False)
    assert payload["epoch"] == 1 and payload["train_state"]["epoch"] == 1
    # Written before epochs were numbered from 1: "epoch" was the 0-based index of the epoch done.
    payload["train_state"]["epoch"] = 0
    del payload["train_state"]["epoch_numbering"]
    torch.save(payload, tmp_path / "run" / LAST)
    resumed = _trainer(tiny_source, spec, tmp_path / "run")
    assert resumed.resume() and resumed.start_epoch == 1
