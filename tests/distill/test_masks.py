"""Box masks: the batched form against a slow per-image, per-box reference."""

import pytest
import torch

from detkd.distill.masks import box_masks


def _slow_masks(boxes, stride, h, w, mode):
    out = torch.zeros(len(boxes), h, w)
    for n, image_boxes in enumerate(boxes):
        for x0, y0, x1, y1 in image_boxes.tolist():
            cells = []
            for y in range(h):
                for x in range(w):
                    # covered: the box / stride overlaps the cell; at least the cell of its top-left corner
                    cx0, cy0 = min(max(int(x0 // stride), 0), w - 1), min(max(int(y0 // stride), 0), h - 1)
                    cx1 = max(min(-(-x1 // stride), w), cx0 + 1)
                    cy1 = max(min(-(-y1 // stride), h), cy0 + 1)
                    if cx0 <= x < cx1 and cy0 <= y < cy1:
                        cells.append((y, x))
            for y, x in cells:
                value = 1.0 if mode == "binary" else 1.0 / len(cells)
                out[n, y, x] = max(out[n, y, x].item(), value)
    return out


@pytest.mark.parametrize("mode", ["binary", "inverse_area"])
def test_batched_masks_equal_the_per_box_reference(mode):
    g = torch.Generator().manual_seed(0)
    boxes = []
    for count in (3, 0, 5, 1):  # an image without boxes among them
        xy = torch.rand(count, 2, generator=g) * 60
        wh = torch.rand(count, 2, generator=g) * 40 + 1
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    for stride, h, w in ((8, 8, 9), (16, 4, 5)):
        got = box_masks(boxes, stride, h, w, mode=mode)
        torch.testing.assert_close(got, _slow_masks(boxes, stride, h, w, mode))
    assert box_masks(boxes, 8, 8, 9, mode=mode)[1].abs().sum() == 0
