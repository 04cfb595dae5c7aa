"""Run logs: exact round trips, resume/truncate without duplicated curves, and the curves PNG."""

import math
import sys

import pytest

from detkd.engine.plots import draw_curves, plot_run
from detkd.engine.run_log import RunLogger, read_log, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _log_epochs(logger, epochs, steps_per_epoch=3, offset=0.0):
    """Losses 1/step (+offset) every step, AP = epoch / 10 (+offset) after every epoch."""
    for epoch in epochs:
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i + 1
            logger.log_scalars(step, epoch, {"loss": 1 / step + offset, "lr": 0.01}, "train")
        logger.log_metrics(epoch, {"AP": epoch / 10 + offset, "per_class_ap": {"a": 0.5, "b": None}})


def test_round_trip_of_values_and_new_keys(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log_scalars(1, 0, {"loss": 0.1 + 0.2, "cls": 1e-9}, "train")
        logger.log_scalars(2, 0, {"loss": 2.5, "kd_fgd": 123456.789012345}, "train")  # a key appears later
        logger.log_scalars(2, 0, {"loss": 7.0}, "val")
        logger.log_metrics(0, {"AP": 0.25, "AP50": 0.5, "per_class_ap": {"a": 0.125, "b": None}})
    assert read_log(tmp_path) == {
        "loss": [(1, 0.1 + 0.2), (2, 2.5)],  # exact: values are written with repr
        "cls": [(1, 1e-9)],
        "kd_fgd": [(2, 123456.789012345)],
    }
    # The metrics line's numbers are validation rows too (nested ones as key/subkey; None is no number).
    assert read_log(tmp_path, phase="val") == {
        "loss": [(2, 7.0)],
        "AP": [(2, 0.25)],
        "AP50": [(2, 0.5)],
        "per_class_ap/a": [(2, 0.125)],
    }
    assert read_metrics(tmp_path) == [
        {"AP": 0.25, "AP50": 0.5, "per_class_ap": {"a": 0.125, "b": None}, "epoch": 0, "step": 2}
    ]
    header = (tmp_path / "log.csv").read_text().splitlines()[0]
    assert header == "step,epoch,phase,key,value"


def test_reopening_appends(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as logger:
        _log_epochs(logger, [0])
    with RunLogger(tmp_path, tensorboard=False) as logger:
        _log_epochs(logger, [1])
        logger.log_metrics(2, {"AP": 0.9})  # no step given: the last step seen (6), also after reopening
    assert [s for s, _ in read_log(tmp_path)["loss"]] == [1, 2, 3, 4, 5, 6]
    assert [(m["epoch"], m["step"]) for m in read_metrics(tmp_path)] == [(0, 3), (1, 6), (2, 6)]
    assert (tmp_path / "log.csv").read_text().count("step,epoch") == 1  # one header


def test_truncate_after_drops_later_epochs(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as logger:
        _log_epochs(logger, [0, 1, 2])
    # Resumed from the checkpoint of epoch 0: epochs 1 and 2 are redone with different values.
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.truncate_after(0)
        _log_epochs(logger, [1, 2], offset=100.0)
    loss = read_log(tmp_path)["loss"]
    assert [s for s, _ in loss] == list(range(1, 10))
    assert [v for _, v in loss] == pytest.approx([1, 1 / 2, 1 / 3] + [1 / s + 100 for s in range(4, 10)])
    assert [(m["epoch"], m["AP"]) for m in read_metrics(tmp_path)] == [(0, 0.0), (1, 100.1), (2, 100.2)]
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.truncate_after(-1)  # a fresh run in an old directory
    assert read_log(tmp_path) == {} and read_metrics(tmp_path) == []


def test_a_line_cut_off_by_a_crash_is_dropped(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as logger:
        _log_epochs(logger, [0])
    with open(tmp_path / "log.csv", "a") as f:
        f.write("4,1,train,lo")  # killed mid-row
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"AP": 0.')
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log_scalars(4, 1, {"loss": 0.25}, "train")
        logger.log_metrics(1, {"AP": 0.5})
    assert read_log(tmp_path)["loss"][-2:] == [(3, 1 / 3), (4, 0.25)]
    assert [m["AP"] for m in read_metrics(tmp_path)] == [0.0, 0.5]


def test_no_crash_without_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with RunLogger(tmp_path, tensorboard=True) as logger:
        _log_epochs(logger, [0])
        logger.truncate_after(0)
        _log_epochs(logger, [1])
    assert len(read_log(tmp_path)["loss"]) == 6 and len(read_metrics(tmp_path)) == 2
    assert not (tmp_path / "tb").exists()


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_run_writes_a_png(tmp_path):
    with RunLogger(tmp_path / "run", tensorboard=False) as logger:
        _log_epochs(logger, range(4))
        logger.log_scalars(13, 4, {"kd_neg": -0.5}, "train")  # a negative term rules out the log scale
    out = plot_run(tmp_path / "run")
    assert out == tmp_path / "run" / "curves.png"
    assert _png_size(out) == (1100, 400)  # figsize (11, 4) at 100 dpi
    assert not list((tmp_path / "run").glob("*.tmp"))


@pytest.mark.parametrize("what", ["losses only", "nothing"])
def test_plot_run_with_partial_logs(tmp_path, what):
    with RunLogger(tmp_path, tensorboard=False) as logger:
        if what == "losses only":
            logger.log_scalars(1, 0, {"loss": 2.0}, "train")
    assert _png_size(plot_run(tmp_path)) == (1100, 400)


def test_metrics_with_nan_and_numpy_values(tmp_path, strict_json):
    np = pytest.importorskip("numpy")
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log_metrics(1, {"APs": math.nan, "AP": np.float32(0.5), "hist": np.arange(3), "inf": np.float64("inf")})
    (m,) = read_metrics(tmp_path)
    assert m["APs"] is None and m["inf"] is None and m["AP"] == 0.5 and m["hist"] == [0, 1, 2]
    strict_json((tmp_path / "metrics.jsonl").read_text())  # strict parsers reject bare NaN / Infinity


def test_evaluation_at_its_real_step_and_in_log_csv(tmp_path):
    # log_every=10: the last logged step is 10, but the evaluation ran after step 13.
    with RunLogger(tmp_path, tensorboard=False) as logger:
        for step in (1, 10):
            logger.log_scalars(step, 1, {"loss": 1.0}, "train")
        logger.log_metrics(1, {"AP": 0.5}, step=13)
    assert read_metrics(tmp_path)[0]["step"] == 13
    assert read_log(tmp_path, phase="val") == {"AP": [(13, 0.5)]}


def test_curves_of_a_short_run_draw_points(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log_scalars(1, 1, {"loss": 2.0, "cls": 1.0}, "train")  # one logged step, one epoch
        logger.log_metrics(1, {"AP": 0.0}, step=3)
    ax_loss, ax_map = draw_curves(tmp_path).axes[:2]
    for ax in (ax_loss, ax_map):
        assert ax.lines, "nothing drawn"
        for line in ax.lines:  # a single point draws no line segment: it needs a marker
            assert line.get_marker() not in (None, "None", "", " ") and len(line.get_xdata()) == 1
    assert list(ax_map.lines[0].get_xdata()) == [1]  # epoch 1, as numbered in the logs


def test_legend_does_not_cover_the_loss_line(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as logger:
        for step in range(1, 301):  # a distillation run: many terms over the whole height, their sum on top
            f = 1 / step**0.2
            values = {"cls": f, "box": 0.8 * f, "ctr": 0.62 + 0.05 * f, "kd_fitnet": 0.3 * f, "kd_pkd": 0.15 * f}
            values["kd_cwd"] = 0.08 * f
            logger.log_scalars(step, 1, {**values, "loss": sum(values.values())}, "train")
    fig = draw_curves(tmp_path)
    fig.canvas.draw()  # lays out the figure (constrained layout)
    ax_loss = fig.axes[0]
    legend_box = ax_loss.get_legend().get_window_extent()
    (loss_line,) = [line for line in ax_loss.lines if line.get_label() == "loss"]
    points = loss_line.get_transform().transform(loss_line.get_xydata())
    inside = [(x, y) for x, y in points if legend_box.contains(x, y)]
    assert inside == [], f"{len(inside)} points of the total loss under the legend"
