"""The AMP path (float16 autocast + GradScaler) run on the CPU through the trainer's ``amp_on_cpu`` hook:
scaler state in checkpoints and resumed exactly, unscaled gradients clipped, a run saved without AMP resumable."""

import torch
from torch import nn

from detkd.data.loader import ViewedDataset, build_loader
from detkd.data.views import ViewPolicy
from detkd.engine.tasks import DetectionTask
from detkd.engine.trainer import LAST, Trainer
from detkd.models.builders import build_detector
from detkd.models.checkpoint import read_checkpoint


def _trainer(source, spec, out, *, amp: bool, epochs: int = 2, seed: int = 1, **kw) -> Trainer:
    torch.manual_seed(0)
    loader = build_loader(
        ViewedDataset(source, ViewPolicy(sizes=(64,), flip_prob=0.5), train=True, seed=seed),
        batch_size=2,
        shuffle=True,
        seed=seed,
    )
    return Trainer(
        DetectionTask(build_detector(spec)),
        train_loader=loader,
        val_loader=None,
        val_source=None,
        class_names=source.class_names,
        out_dir=out,
        epochs=epochs,
        lr=0.01,
        warmup_iters=2,
        seed=seed,
        progress=False,
        amp=amp,
        amp_on_cpu=True,
        **kw,
    )


def test_amp_scaler_state_is_saved_and_resumed_exactly(tmp_path, source_factory, spec_factory):
    source = source_factory(tmp_path / "img", n=4)
    spec = spec_factory("fcos")
    full = _trainer(source, spec, tmp_path / "full", amp=True)
    assert full.amp and full.scaler.is_enabled()
    seen: list[float] = []
    full.step_hook = lambda step, values: seen.append(values["amp_scale"])
    full.fit()

    part = _trainer(source, spec, tmp_path / "part", amp=True)
    part.fit(stop_after=0)
    saved = read_checkpoint(tmp_path / "part" / LAST)["train_state"]["scaler"]
    assert saved["scale"] == part.scaler.get_scale() == seen[1]  # 2 steps per epoch
    resumed = _trainer(source, spec, tmp_path / "part", amp=True)
    assert resumed.resume() and resumed.scaler.get_scale() == saved["scale"]
    after: list[float] = []
    resumed.step_hook = lambda step, values: after.append(values["amp_scale"])
    resumed.fit()
    assert after == seen[2:]
    assert resumed.scaler.state_dict() == full.scaler.state_dict()
    assert resumed.skipped_steps <= full.skipped_steps  # the resumed run counts only its own epochs
    a, b = full.student.model.state_dict(), resumed.student.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_a_run_saved_without_amp_resumes_with_amp(tmp_path, source_factory, spec_factory):
    source = source_factory(tmp_path / "img", n=4)
    spec = spec_factory("fcos")
    _trainer(source, spec, tmp_path / "run", amp=False).fit(stop_after=0)
    assert read_checkpoint(tmp_path / "run" / LAST)["train_state"]["scaler"] == {}  # a disabled scaler saves {}
    resumed = _trainer(source, spec, tmp_path / "run", amp=True)
    assert resumed.resume()  # torch's load_state_dict({}) would raise here
    assert resumed.scaler.get_scale() == 2.0**16


def test_gradients_are_unscaled_before_clipping(tmp_path, source_factory, spec_factory, monkeypatch):
    source = source_factory(tmp_path / "img", n=2)
    spec = spec_factory("fcos")
    norms: dict[bool, list[float]] = {}
    clip = nn.utils.clip_grad_norm_
    for amp in (False, True):
        norms[amp] = []

        def record(params, max_norm, _amp=amp, **kw):
            norm = clip(params, max_norm, **kw)
            norms[_amp].append(float(norm))
            return norm

        monkeypatch.setattr(nn.utils, "clip_grad_norm_", record)
        trainer = _trainer(source, spec, tmp_path / f"amp{amp}", amp=amp, epochs=1, grad_clip=1e9)
        trainer.fit()
    # Same weights, same batch at step 1: the clipped norm is the true one (scaled it would be 65536 x larger).
    assert norms[True][0] == norms[True][0]  # not NaN
    assert abs(norms[True][0] - norms[False][0]) <= 0.05 * norms[False][0]
