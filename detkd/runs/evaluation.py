"""``detkd eval`` and ``api.evaluate_checkpoint``: one evaluation of a checkpoint on one split."""

from __future__ import annotations

from pathlib import Path

from detkd.data.defaults import INPUT_SIZE
from detkd.data.formats.detect import open_source
from detkd.data.loader import ViewedDataset, build_loader
from detkd.data.views import ViewPolicy
from detkd.models.checkpoint import check_classes, load_detector, training_sizes
from detkd.runs.setup import resolve_device


def checkpoint_size(payload: dict, default: int = INPUT_SIZE) -> int:
    """The input size a checkpoint was trained at (its recipe's largest ``data.sizes``)."""
    sizes = training_sizes(payload)
    return max(sizes) if sizes else default


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    *,
    split: str = "val",
    size: int | None = None,
    batch_size: int = 8,
    workers: int = 0,
    device: str = "auto",
    format: str | None = None,
    progress: bool = False,
):
    """COCO-style metrics (EvalResult) of a checkpoint on one split: the one evaluation behind
    ``detkd eval`` and ``api.evaluate_checkpoint``. ``size`` defaults to the size it was trained at."""
    from detkd.engine.inference import evaluate_detector

    detector, payload = load_detector(checkpoint)
    source = open_source(data, format=format, split=split)
    check_classes(payload, source.class_names, path=checkpoint)
    policy = ViewPolicy(sizes=(size or checkpoint_size(payload),), flip_prob=0.0)
    loader = build_loader(
        ViewedDataset(source, policy, train=False), batch_size=batch_size, shuffle=False, workers=workers
    )
    run_on = resolve_device(device)
    return evaluate_detector(detector.to(run_on), loader, source, device=run_on, progress=progress)


def visualize_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    *,
    count: int,
    out_dir: str | Path | None = None,
    compare: str | Path | None = None,
    split: str = "val",
    size: int | None = None,
    device: str = "auto",
    format: str | None = None,
    score_thresh: float = 0.3,
) -> list[Path]:
    """PNGs of the first ``count`` images of a split: ground truth, the checkpoint's detections and, with
    ``compare`` (e.g. the teacher), that checkpoint's, side by side. Default folder: CHECKPOINT.vis/."""
    from detkd.engine.visualize import write_prediction_images

    detector, payload = load_detector(checkpoint)
    source = open_source(data, format=format, split=split)
    check_classes(payload, source.class_names, path=checkpoint)
    panels = [(Path(checkpoint).name, detector)]
    if compare is not None:
        other, other_payload = load_detector(compare)
        check_classes(other_payload, source.class_names, path=compare)
        panels.append((Path(compare).name, other))
    out = Path(out_dir) if out_dir else Path(checkpoint).with_suffix(".vis")
    return write_prediction_images(
        panels,
        source,
        out,
        count=count,
        size=size or checkpoint_size(payload),
        device=resolve_device(device),
        score_thresh=score_thresh,
    )
