"""``curves.png`` of a run directory: loss terms per step and validation AP per epoch, from its logs."""

from __future__ import annotations

import math
import os
from pathlib import Path

from detkd.engine.run_log import read_log, read_metrics

PLOT_NAME = "curves.png"

# Series with at most this many points get markers: one or two points draw no visible line.
MARKER_POINTS = 20


def plot_run(run_dir: str | Path) -> Path:
    """Training loss terms per step (smoothed, left) and AP / AP50 per epoch (right) -> run_dir/curves.png."""
    run_dir = Path(run_dir)
    fig = draw_curves(run_dir)
    out = run_dir / PLOT_NAME
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, out)  # a viewer never sees a half-written image
    return out


def draw_curves(run_dir: str | Path):
    """The matplotlib Figure behind ``plot_run`` (the axes are ``fig.axes[:2]``: losses, AP)."""
    # The object API with no pyplot: no global backend switch, no figure registry to leak from.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    series = {k: v for k, v in read_log(run_dir).items() if k != "lr" and v}
    by_epoch = {m["epoch"]: m for m in read_metrics(run_dir) if "epoch" in m}  # last line of an epoch wins

    # constrained layout makes room for the loss legend outside the axes, where it covers no line.
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_loss, ax_map = fig.subplots(1, 2)
    all_values = [v for points in series.values() for _, v in points]
    for key, points in sorted(series.items()):
        steps, values = zip(*points, strict=True)
        marker = "o" if len(points) <= MARKER_POINTS else None
        ax_loss.plot(
            steps, _smooth(values), label=key, linewidth=1.4 if key == "loss" else 0.9, marker=marker, markersize=3
        )
    if series:
        if all(v > 0 for v in all_values if math.isfinite(v)):
            ax_loss.set_yscale("log")  # loss terms span decades; a negative term forbids it
        ax_loss.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax_loss.text(0.5, 0.5, "no losses logged yet", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (smoothed)")

    plotted = False
    for key in ("AP", "AP50"):
        points = sorted((e, 100 * m[key]) for e, m in by_epoch.items() if isinstance(m.get(key), (int, float)))
        if points:
            ax_map.plot(*zip(*points, strict=True), marker="o", label=key)  # epochs 1-based, as in the progress bar
            plotted = True
    if plotted:
        ax_map.legend()
        ax_map.set_ylim(bottom=0)
    else:
        ax_map.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax_map.transAxes)
    ax_map.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_map.set_xlabel("epoch")
    ax_map.set_ylabel("AP (x100), validation")
    fig.suptitle(run_dir.name)
    return fig


def _smooth(values, max_alpha: float = 0.9) -> list[float]:
    """Debiased EMA (as TensorBoard's slider); weaker for short series so they do not lag."""
    alpha = min(max_alpha, max(0.0, 1.0 - 10.0 / len(values)))
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        acc = alpha * acc + (1 - alpha) * v
        weight = alpha * weight + (1 - alpha)
        out.append(acc / weight)
    return out
