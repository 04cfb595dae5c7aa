"""``detkd eval --visualize``: PNGs of ground truth beside the detections, on the original image."""

import numpy as np
import torch
from PIL import Image

from detkd import api
from detkd.cli import main
from detkd.engine.visualize import write_prediction_images


class _FixedDetector(torch.nn.Module):
    """Answers one box (in view pixels) for every image: where it is drawn is then known exactly."""

    def __init__(self, box):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.box = torch.tensor([box], dtype=torch.float32)

    def predict(self, images, image_sizes):
        return [{"boxes": self.box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])} for _ in image_sizes]


def test_panels_show_ground_truth_and_detections_mapped_to_the_original(tmp_path, small_synth):
    source = api.open_source(small_synth, format="coco", split="val")
    h, w = source.records[0].height, source.records[0].width
    # At size 32 the 64 px image is halved: a box at (4, 4)-(12, 12) in the view is (8, 8)-(24, 24) in it.
    det = _FixedDetector([4.0, 4.0, 12.0, 12.0])
    (path,) = write_prediction_images([("fixed", det)], source, tmp_path / "vis", count=1, size=32)
    strip = np.asarray(Image.open(path))
    assert strip.shape == (h, 2 * w, 3)  # ground truth | detections, side by side at original size
    gt, pred = strip[:, :w], strip[:, w:]
    red = (pred[..., 0] == 255) & (pred[..., 1] == 0) & (pred[..., 2] == 0)
    ys, xs = np.nonzero(red)
    assert ys.min() == 8 and xs.min() == 8 and ys.max() <= 24 and xs.max() <= 24  # the box's outline
    green = (gt[..., 0] == 0) & (gt[..., 1] == 255) & (gt[..., 2] == 0)
    assert green.sum() > 0 and not green[:, :].all()  # ground-truth outlines drawn
    assert "fixed (red)" in (tmp_path / "vis" / "README.txt").read_text()


def test_eval_visualize_writes_one_png_per_image_with_a_compare_panel(
    tmp_path, small_synth, checkpoint_factory, capsys
):
    names = api.open_source(small_synth, format="coco", split="train").class_names
    a = checkpoint_factory(tmp_path / "a.pt", names, seed=0)
    b = checkpoint_factory(tmp_path / "b.pt", names, seed=1)
    argv = ["eval", "--checkpoint", str(a), "--data", str(small_synth), "--workers", "0", "--device", "cpu"]
    assert main([*argv, "--visualize", "2", "--compare", str(b), "--size", "64", "--vis-score", "0"]) == 0
    out = capsys.readouterr().out
    files = sorted((tmp_path / "a.vis").glob("*.png"))
    assert len(files) == 2 and f"2 prediction image(s) written to {tmp_path / 'a.vis'}" in out
    record = api.open_source(small_synth, format="coco", split="val").records[0]
    assert np.asarray(Image.open(files[0])).shape == (record.height, 3 * record.width, 3)
