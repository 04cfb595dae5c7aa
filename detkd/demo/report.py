"""The demo's summary: the table, the store line, where every artifact is, a conclusion computed from the
numbers; printed, and written as ``report.md``, ``demo.png`` and ``demo.json``.

AP is stored as a fraction (as in every metrics.json) and shown x100 (COCO AP@[.5:.95]).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from detkd.jsonio import dumps

ROW_ORDER = ("teacher", "student", "online", "stored")


def _mean(values: list) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def _spread(values: list) -> float:
    """Largest minus smallest (of the finite values): the seed-to-seed spread, 0 for one seed."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return max(vals) - min(vals) if vals else float("nan")


def row_stats(row: dict) -> dict:
    """Means over a row's seeds; AP and AP50 x100."""
    runs = row["runs"]
    ap = [100 * r["AP"] if r["AP"] is not None else None for r in runs]
    forwards = [r["teacher_forwards"] for r in runs]
    return {
        "AP": _mean(ap),
        "AP_seeds": ap,
        "AP_spread": _spread(ap),
        "AP50": _mean([100 * r["AP50"] if r["AP50"] is not None else None for r in runs]),
        "seconds": _mean([r["seconds"] for r in runs]),
        "epoch_seconds": _mean([r["epoch_seconds"] for r in runs]),
        "teacher_forwards": None if any(f is None for f in forwards) else _mean(forwards),
        "reused": any(r.get("reused") for r in runs),
    }


def _num(value: float | None, fmt: str = ".1f") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, fmt)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def table_lines(summary: dict) -> list[str]:
    seeds = summary["scale"]["seeds"]
    many = len(seeds) > 1
    head = "| run | AP | AP50 |" + (f" AP per seed ({', '.join(map(str, seeds))}) |" if many else "")
    head += " wall s | s/epoch | teacher forwards |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key in ROW_ORDER:
        row = summary["rows"][key]
        s = row_stats(row)
        label = row["label"] + (" (reused)" if s["reused"] else "")
        # the teacher's own training is not counted: it is what every row starts from
        forwards = "- (training)" if key == "teacher" else f"{s['teacher_forwards']:,.0f}"
        per_seed = ""
        if many:
            per_seed = " (one teacher) |" if key == "teacher" else f" {' / '.join(_num(a) for a in s['AP_seeds'])} |"
        lines.append(
            f"| {label} | {_num(s['AP'])} | {_num(s['AP50'])} |{per_seed} {_num(s['seconds'], '.0f')} | "
            f"{_num(s['epoch_seconds'])} | {forwards} |"
        )
    return lines


def store_line(summary: dict) -> str:
    st = summary["store"]
    coco = st["projected_coco"]
    return (
        f"store ({st['policy']}: rank-{st['rank']} {st['value_dtype']} whole maps, {st['images']} images x "
        f"{len(st['views'])} views "
        f"= {st['records']} image-views): {st['bytes_per_image_view']:,.0f} bytes per image-view, "
        f"{100 * st['ratio_to_dense']:.2f} % of the dense fp16 FPN maps "
        f"({1 / st['ratio_to_dense']:.0f}x smaller; at COCO scale {coco['bytes_per_view'] / 1024:,.0f} KiB per view, "
        f"{100 * coco['ratio_to_dense']:.2f} %); built in {_num(st['seconds'], '.0f')} s with "
        f"{st['teacher_forwards']:,} teacher forwards ({st['records']} stored image-views + {st['fit_views']} "
        "to fit the bases)" + (" (reused)" if st.get("reused") else "")
    )


def conclusion(summary: dict) -> str:
    """One line from the numbers: each distilled row against the student alone, in AP and time per epoch."""
    rows = {k: row_stats(summary["rows"][k]) for k in ROW_ORDER}
    alone = rows["student"]
    parts = []
    for key, name in (("stored", "distillation from the store"), ("online", "online distillation")):
        r = rows[key]
        gain = r["AP"] - alone["AP"]
        ratio = r["epoch_seconds"] / alone["epoch_seconds"] if alone["epoch_seconds"] else float("nan")
        time = f"at {_num(ratio)}x its time per epoch"
        if not math.isfinite(gain):
            parts.append(f"{name}: no AP to compare")
        elif round(gain, 1) > 0:
            noise = max(alone["AP_spread"], r["AP_spread"])
            within = f" (within the seed-to-seed spread, {noise:.1f})" if gain <= noise else ""
            parts.append(f"{name}: +{gain:.1f} AP over the student alone{within} {time}")
        else:
            diff = f"{gain:+.1f} AP" if round(gain, 1) != 0 else "no AP gain"
            parts.append(f"{name}: NOT ahead of the student alone ({diff}) {time}")
    return "; ".join(parts)


def _artifact_lines(summary: dict, *, code: str) -> list[str]:
    p = summary["paths"]

    def q(path: str) -> str:
        return f"{code}{path}{code}"

    lines = [f"- data: {q(p['data'])} (COCO json in annotations/, images in images/; scale in scale.json)"]
    for key in ROW_ORDER:
        for d in p["runs"][key]:
            lines.append(f"- {summary['rows'][key]['label']}: {q(d)} (last.pt, metrics.json, curves.png)")
    lines += [
        f"- store: {q(p['store'])} (`detkd store info` describes it)".replace("`", code),
        f"- report: {q(p['report'])}; plot: {q(p['plot'])}; numbers: {q(p['summary'])}",
        f"- prediction pictures (ground truth | stored-distilled student | teacher): {q(p['predictions'])}",
    ]
    return lines


def _explained(summary: dict, *, markdown: bool) -> list[str]:
    h = "## " if markdown else ""
    code = "`" if markdown else ""
    seeds = summary["scale"]["seeds"]
    notes = [
        f"AP = COCO AP@[.5:.95] x100 on the validation split ({summary['val_images']} images); "
        "AP50 likewise at IoU 0.5.",
        f"Students: {_count(summary['scale']['student_epochs'], 'epoch')} on {summary['train_images']} training "
        f"images, {_count(len(seeds), 'seed')} ({', '.join(map(str, seeds))}; means shown); "
        f"teacher: {_count(summary['scale']['teacher_epochs'], 'epoch')}, trained once.",
        "wall s = the row's own time (training and final evaluation); s/epoch = training time per epoch; "
        "teacher forwards = teacher passes the row cost (online: one per training image-view).",
    ]
    if any(row_stats(summary["rows"][k])["reused"] for k in ROW_ORDER) or summary["store"].get("reused"):
        notes.append("(reused) = finished by an earlier demo in this folder; its wall time is the one recorded then.")
    lines = [
        *(sum(([n, ""] for n in notes), []) if markdown else [*notes, ""]),  # markdown: one paragraph each
        *table_lines(summary),
        "",
        store_line(summary),
        "",
        f"{h}Where everything is",
        *([""] if markdown else []),
        *_artifact_lines(summary, code=code),
        "",
        f"{h}Conclusion",
        *([""] if markdown else []),
        conclusion(summary),
    ]
    if summary.get("quick"):
        lines += [""] if markdown else []
        lines.append(
            "--quick only checks that the pipeline runs end to end: at this tiny scale near-zero APs are "
            "expected and the comparison means nothing; run `detkd demo` for the real numbers."
        )
    return lines


def format_demo(summary: dict) -> str:
    """The summary printed at the end of ``detkd demo``."""
    return "\n".join(_explained(summary, markdown=False))


def report_markdown(summary: dict) -> str:
    return "\n".join(["# detkd demo", "", *_explained(summary, markdown=True)]) + "\n"


def plot_demo(summary: dict, path: Path) -> Path:
    """Two panels: AP (x100) per row, with each seed's point, and wall time per row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    method = summary["method"]
    labels = ["teacher", "student\nalone", f"online\n({method})", f"from the store\n({method})"]
    stats = [row_stats(summary["rows"][k]) for k in ROW_ORDER]
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)  # Agg: no display needed
    ax_ap, ax_t = fig.subplots(1, 2)
    colours = ["tab:gray", "tab:blue", "tab:orange", "tab:green"]
    for ax, key, fmt in ((ax_ap, "AP", ".1f"), (ax_t, "seconds", ".0f")):
        values = [s[key] if math.isfinite(s[key]) else 0.0 for s in stats]
        bars = ax.bar(range(len(ROW_ORDER)), values, color=colours)
        # AP values inside the bars: the seeds' points sit near the top
        where = "center" if key == "AP" else "edge"
        ax.bar_label(bars, labels=[_num(s[key], fmt) for s in stats], fontsize=8, label_type=where)
        ax.set_xticks(range(len(ROW_ORDER)), labels, fontsize=8)
        ax.set_ylim(bottom=0)
    for i, s in enumerate(stats):  # each seed's AP as a point on its bar
        seeds = [a for a in s["AP_seeds"] if a is not None]
        ax_ap.plot([i] * len(seeds), seeds, "k.", markersize=6)
    ax_ap.set_title(f"AP per row (COCO AP@[.5:.95] x100, validation, {summary['val_images']} images)", fontsize=10)
    ax_ap.set_ylabel("AP (x100)")
    ax_t.set_title("wall time per row (training + final evaluation)", fontsize=10)
    ax_t.set_ylabel("seconds")
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)  # a viewer never sees a half-written image
    return path


def write_outputs(summary: dict, out: Path) -> None:
    """demo.json, report.md and demo.png in ``out``; the summary on stdout."""
    (out / "demo.json").write_text(dumps(summary, indent=2))
    (out / "report.md").write_text(report_markdown(summary))
    plot_demo(summary, out / "demo.png")
    print(format_demo(summary))
