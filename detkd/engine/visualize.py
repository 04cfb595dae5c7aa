"""PNG pictures of validation predictions: ground truth beside one or two detectors' detections.

Drawn on the original image (predictions mapped back from the evaluated view) with class names and
scores, one panel per source, side by side, so a user sees what the numbers mean.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from detkd.data.formats.base import DetectionSource
from detkd.data.loader import Batch, Collate, ViewedDataset
from detkd.data.views import ViewPolicy, boxes_to_original
from detkd.models.detector import Detector

GROUND_TRUTH_COLOUR = "lime"
PANEL_COLOURS = ("red", "deepskyblue")  # one per detector panel


@torch.no_grad()
def predictions_in_original(detector: Detector, batch: Batch, *, score_thresh: float) -> dict[str, torch.Tensor]:
    """A one-image batch (as evaluation sees it) through ``detector``; boxes back in original pixels."""
    detector.eval()
    device = next(detector.parameters()).device
    (pred,) = detector.predict(batch.images.to(device), batch.image_sizes)
    keep = (pred["labels"] > 0) & (pred["scores"] >= score_thresh)
    boxes = boxes_to_original(pred["boxes"][keep].float().cpu(), batch.views[0], batch.orig_sizes[0])
    return {"boxes": boxes, "scores": pred["scores"][keep].float().cpu(), "labels": pred["labels"][keep].cpu()}


def _panel(image: torch.Tensor, boxes, labels, names, colour: str, scores=None) -> torch.Tensor:
    text = [names[int(lb) - 1] if 0 < int(lb) <= len(names) else str(int(lb)) for lb in labels]
    if scores is not None:
        text = [f"{t} {float(s):.2f}" for t, s in zip(text, scores, strict=True)]
    if len(boxes) == 0:
        return image.clone()
    return draw_bounding_boxes(image, boxes, labels=text, colors=colour, width=2)


def write_prediction_images(
    detectors: list[tuple[str, Detector]],
    source: DetectionSource,
    out_dir: str | Path,
    *,
    count: int,
    size: int,
    device: torch.device | str = "cpu",
    score_thresh: float = 0.3,
) -> list[Path]:
    """``count`` PNGs (the first images of ``source``): ground truth, then each (title, detector)'s
    detections above ``score_thresh``. Returns the files written; the titles go in the file names' order
    ``<image_id>.png`` and in ``README.txt`` beside them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for _, detector in detectors:
        detector.to(device)
    names = source.class_names
    policy = ViewPolicy(sizes=(size,), flip_prob=0.0)
    dataset, collate = ViewedDataset(source, policy, train=False), Collate(policy.canvas)
    written = []
    for index in range(min(count, len(source))):
        sample = source.load(index)
        image, record = sample.image, sample.record
        batch = collate([dataset[index]])  # exactly what evaluation feeds the detector
        panels = [_panel(image, record.boxes, record.labels, names, GROUND_TRUTH_COLOUR)]
        for (_, detector), colour in zip(detectors, PANEL_COLOURS, strict=False):
            pred = predictions_in_original(detector, batch, score_thresh=score_thresh)
            panels.append(_panel(image, pred["boxes"], pred["labels"], names, colour, pred["scores"]))
        strip = torch.cat(panels, dim=2)  # side by side
        path = out / f"{record.image_id}.png"
        Image.fromarray(strip.permute(1, 2, 0).numpy()).save(path)
        written.append(path)
    titles = ", ".join(
        ["ground truth (green)", *(f"{t} ({c})" for (t, _), c in zip(detectors, PANEL_COLOURS, strict=False))]
    )
    (out / "README.txt").write_text(
        f"Panels, left to right: {titles}. Detections with score >= {score_thresh}; size {size} px (longer side).\n"
    )
    return written
