"""Run-directory logs: long-format CSV, metrics JSONL, optional TensorBoard (the curves: ``engine.plots``).

``log.csv`` is long format (``step,epoch,phase,key,value``, one row per value) rather than one
column per key: a loss term that appears later (a distiller switched on after warm-up, a
validation loss) needs no header rewrite, rows from different phases never leave holes, and
dropping the epochs a resumed run redoes is a plain row filter. ``metrics.jsonl`` holds one JSON
object per evaluated epoch (nested values such as per-class AP included; strict JSON, NaN -> null);
its numbers are also rows of ``log.csv`` with phase "val" (``per_class_ap/<class>`` for nested ones).
Epoch numbers are whatever the caller passes; the trainer numbers epochs from 1.

Resuming: opening an existing run directory appends. ``truncate_after(epoch)`` drops the rows and
metric lines of later epochs and makes TensorBoard hide their events (``purge_step``), so curves
never show a stretch twice. A row cut off by a crash is dropped when the file is opened again.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from detkd.jsonio import dumps

log = logging.getLogger(__name__)

CSV_FIELDS = ["step", "epoch", "phase", "key", "value"]
CSV_NAME = "log.csv"
METRICS_NAME = "metrics.jsonl"


class RunLogger:
    """Appends scalars to ``run_dir/log.csv`` (and TensorBoard in ``run_dir/tb``) and metrics to JSONL."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.run_dir / CSV_NAME
        self.metrics_path = self.run_dir / METRICS_NAME
        self._tensorboard = tensorboard
        self._tb = None  # SummaryWriter, opened on first use
        self._purge_step: int | None = None
        _drop_partial_last_line(self.csv_path)
        _drop_partial_last_line(self.metrics_path)
        if not self.csv_path.exists() or self.csv_path.stat().st_size == 0:
            _atomic_write(self.csv_path, _csv_text([CSV_FIELDS]))
        # Metrics without an explicit step go to TensorBoard at the last step seen, also across a resume.
        self._step = max(0, self._last_step())
        self._open_csv()

    def log_scalars(self, step: int, epoch: int, values: Mapping[str, float], phase: str = "train") -> None:
        """One row per value; TensorBoard tag ``{phase}/{key}``."""
        tb = self._tb_writer()
        for key, value in values.items():
            v = float(value)
            self._writer.writerow([int(step), int(epoch), phase, key, repr(v)])
            if tb is not None:
                tb.add_scalar(f"{phase}/{key}", v, int(step))
        self._csv.flush()
        self._step = max(self._step, int(step))

    def log_metrics(self, epoch: int, metrics: Mapping, *, step: int | None = None) -> None:
        """One JSON line ``{"epoch", "step", **metrics}``; its numbers (and dicts of numbers) also go to
        log.csv (phase "val") and TensorBoard (``val/<key>``).

        ``step``: the step the metrics were measured at (the trainer passes it); without it, the last
        step logged, so validation curves share the training x axis.
        """
        step = self._step if step is None else int(step)
        self._step = max(self._step, step)
        with open(self.metrics_path, "a") as f:
            f.write(_json_line({**metrics, "epoch": int(epoch), "step": step}))
        numbers = list(_numbers(metrics, prefix="val"))
        for tag, v in numbers:
            self._writer.writerow([step, int(epoch), "val", tag.removeprefix("val/"), repr(v)])
        self._csv.flush()
        tb = self._tb_writer()
        if tb is not None:
            for tag, v in numbers:
                tb.add_scalar(tag, v, step)
            tb.flush()

    def truncate_after(self, epoch: int) -> None:
        """Drop everything logged for epochs > ``epoch`` (a resumed run redoes them).

        A number below the first epoch drops all: 0 for the trainer's epochs, which start at 1.
        """
        self._csv.close()
        rows = [[r[k] for k in CSV_FIELDS] for r in _csv_rows(self.csv_path) if r["epoch"] <= epoch]
        _atomic_write(self.csv_path, _csv_text([CSV_FIELDS, *rows]))
        lines = [m for m in _read_jsonl(self.metrics_path) if m.get("epoch", -1) <= epoch]
        _atomic_write(self.metrics_path, "".join(_json_line(m) for m in lines))
        kept = self._last_step()
        self._step = max(0, kept)
        self._open_csv()
        if self._tensorboard:
            # A writer opened with purge_step makes TensorBoard hide the older events at steps >= it.
            if self._tb is not None:
                self._tb.close()
                self._tb = None
            self._purge_step = kept + 1

    def close(self) -> None:
        if not self._csv.closed:
            self._csv.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open_csv(self) -> None:
        self._csv = open(self.csv_path, "a", newline="")  # noqa: SIM115 - kept open, closed in close()
        self._writer = csv.writer(self._csv, lineterminator="\n")

    def _last_step(self) -> int:
        """Largest step in the CSV and metrics lines, -1 if none."""
        steps = [r["step"] for r in _csv_rows(self.csv_path)]
        steps += [m["step"] for m in _read_jsonl(self.metrics_path) if isinstance(m.get("step"), int)]
        return max(steps, default=-1)

    def _tb_writer(self):
        if not self._tensorboard:
            return None
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=self._purge_step)
            except Exception as exc:  # tensorboard missing or broken: the CSV and JSONL still have it all
                log.warning("TensorBoard logging disabled: %s", exc)
                self._tensorboard = False
                return None
        return self._tb


def read_log(run_dir: str | Path, *, phase: str = "train") -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` of one phase, by step; a step logged twice keeps its last value."""
    series: dict[str, dict[int, float]] = {}
    for row in _csv_rows(Path(run_dir) / CSV_NAME):
        if row["phase"] == phase:
            series.setdefault(row["key"], {})[row["step"]] = row["value"]
    return {key: sorted(points.items()) for key, points in series.items()}


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The metrics lines in order written; a line that does not parse (a crash mid-write) is skipped."""
    return _read_jsonl(Path(run_dir) / METRICS_NAME)


def _numbers(metrics: Mapping, *, prefix: str) -> Iterator[tuple[str, float]]:
    for key, value in metrics.items():
        if key in ("epoch", "step") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            yield f"{prefix}/{key}", float(value)
        elif isinstance(value, Mapping):  # e.g. per_class_ap -> val/per_class_ap/<class>
            yield from _numbers(value, prefix=f"{prefix}/{key}")


def _csv_rows(path: Path) -> Iterator[dict]:
    """Parsed rows of log.csv; malformed rows are skipped rather than failing a whole run's plots."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                yield {
                    "step": int(row["step"]),
                    "epoch": int(row["epoch"]),
                    "phase": row["phase"],
                    "key": row["key"],
                    "value": float(row["value"]),
                }
            except (TypeError, ValueError, KeyError):
                continue


def _csv_text(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([[repr(v) if isinstance(v, float) else v for v in r] for r in rows])
    return buf.getvalue()


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out


def _json_line(item: Mapping) -> str:
    return dumps(item, default=_to_builtin) + "\n"  # strict JSON: NaN is written as null


def _to_builtin(obj):
    # numpy / torch scalars and arrays that slipped into a metrics dict
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to {METRICS_NAME}")


def _drop_partial_last_line(path: Path) -> None:
    # A crash mid-write leaves a line without its newline; appending would glue the next row onto it.
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
    data = path.read_bytes()
    _atomic_write(path, data[: data.rfind(b"\n") + 1].decode())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
