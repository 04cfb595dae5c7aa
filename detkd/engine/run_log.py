"""Run-directory logs: long-format CSV, metrics JSONL, optional TensorBoard, and a PNG of the curves.

The CSV is long format (step, epoch, phase, key, value) so new loss terms never need a header
rewrite, and a resumed run can drop the rows of epochs it is about to redo.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from pathlib import Path

log = logging.getLogger(__name__)

CSV_FIELDS = ["step", "epoch", "phase", "key", "value"]


class RunLogger:
    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.run_dir / "log.csv"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        new = not self.csv_path.exists()
        self._csv = open(self.csv_path, "a", newline="")  # noqa: SIM115 (closed in close())
        self._writer = csv.writer(self._csv)
        if new:
            self._writer.writerow(CSV_FIELDS)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tb"))
            except Exception as exc:  # tensorboard missing or broken: logs still go to CSV
                log.debug("TensorBoard disabled: %s", exc)

    def log_scalars(self, step: int, epoch: int, values: dict[str, float], phase: str = "train") -> None:
        for k, v in values.items():
            self._writer.writerow([step, epoch, phase, k, f"{float(v):.6g}"])
            if self._tb is not None:
                self._tb.add_scalar(f"{phase}/{k}", float(v), step)
        self._csv.flush()

    def log_metrics(self, epoch: int, metrics: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"epoch": epoch, **metrics}) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self._tb.add_scalar(f"val/{k}", float(v), epoch)
            self._tb.flush()

    def truncate_after(self, epoch: int) -> None:
        """Drop rows of epochs > ``epoch`` (a run resumed from an older checkpoint redoes them)."""
        self._csv.close()
        rows = list(csv.reader(open(self.csv_path, newline="")))  # noqa: SIM115
        kept = [rows[0]] + [r for r in rows[1:] if int(r[1]) <= epoch] if rows else [CSV_FIELDS]
        with open(self.csv_path, "w", newline="") as f:
            csv.writer(f).writerows(kept)
        if self.metrics_path.exists():
            lines = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip()]
            lines = [ln for ln in lines if json.loads(ln)["epoch"] <= epoch]
            self.metrics_path.write_text("".join(ln + "\n" for ln in lines))
        self._csv = open(self.csv_path, "a", newline="")  # noqa: SIM115
        self._writer = csv.writer(self._csv)

    def close(self) -> None:
        self._csv.close()
        if self._tb is not None:
            self._tb.close()


def read_log(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` for the training phase."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    path = Path(run_dir) / "log.csv"
    if path.exists():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row["phase"] == "train":
                    series[row["key"]].append((int(row["step"]), float(row["value"])))
    return dict(series)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_run(run_dir: str | Path) -> Path:
    """Loss terms per step (left) and AP / AP50 per epoch (right) -> run_dir/curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    series = read_log(run_dir)
    metrics = read_metrics(run_dir)
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 4))
    for key, points in sorted(series.items()):
        if key == "lr" or not points:
            continue
        steps, values = zip(*points, strict=True)
        ax_loss.plot(steps, _smooth(values), label=key, linewidth=1.2 if key == "loss" else 0.8)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    if ax_loss.lines:
        ax_loss.legend(fontsize=6, ncol=2)
    plotted = False
    for key in ("AP", "AP50"):
        pts = [(m["epoch"] + 1, m[key]) for m in metrics if key in m]
        if pts:
            ax_map.plot(*zip(*pts, strict=True), marker="o", label=key)
            plotted = True
    ax_map.set_xlabel("epoch")
    ax_map.set_ylabel("mAP")
    ax_map.set_ylim(bottom=0)
    if plotted:
        ax_map.legend()
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _smooth(values, alpha: float = 0.9) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out
