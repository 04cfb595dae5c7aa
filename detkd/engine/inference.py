"""Run a detector over a loader and score it against the source's ground truth."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from detkd.data.formats.base import DetectionSource
from detkd.data.views import boxes_to_original
from detkd.models.detector import Detector

if TYPE_CHECKING:
    from detkd.engine.metrics import EvalResult


@torch.no_grad()
def evaluate_detector(
    detector: Detector,
    loader: DataLoader,
    source: DetectionSource,
    *,
    device: torch.device | str = "cpu",
    amp: bool = False,
    progress: bool = True,
) -> EvalResult:
    """COCO-style evaluation in original image coordinates (views are undone)."""
    from detkd.engine.metrics import DetectionEvaluator

    was_training = detector.training
    detector.eval()
    evaluator = DetectionEvaluator(records=source.records, class_names=source.class_names)
    device = torch.device(device)
    for batch in tqdm(loader, desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            preds = detector.predict(batch.images.to(device), batch.image_sizes)
        for pred, view, orig, image_id in zip(preds, batch.views, batch.orig_sizes, batch.image_ids, strict=True):
            # Dense heads carry an (always negative) background channel 0; it is not a class.
            keep = pred["labels"] > 0
            boxes = boxes_to_original(pred["boxes"][keep].float().cpu(), view, orig)
            evaluator.add(image_id, boxes, pred["scores"][keep].float().cpu(), pred["labels"][keep].cpu())
    detector.train(was_training)
    return evaluator.compute()
