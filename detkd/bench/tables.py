"""README tables rendered from the committed results files (``benchmarks/results/*.json``).

README.md marks each generated table with a pair of comments::

    <!-- results: shapes_methods.json -->
    ...generated, do not edit...
    <!-- /results -->

``detkd bench readme`` rewrites every marked block from its file; ``--check`` only reports
blocks that are out of date (a test runs it, so README cannot drift from the results).
"""

from __future__ import annotations

import re
from pathlib import Path

from detkd.bench.results import read_json

BLOCK = re.compile(r"(<!-- results: (?P<name>[\w.-]+\.json) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)
GROUP_TITLES = {"methods": "online", "stored": "from the store", "selected": "online through the store's selection"}


def _pts(v: float | None, sign: bool = False) -> str:
    if v is None:
        return "—"
    return f"{v:+.1f}" if sign else f"{v:.1f}"


def accuracy_table(payload: dict) -> str:
    """Markdown: one row per run (student, then each group's methods), AP x100 per seed and summary."""
    student = payload["student"]
    lines = [
        "| run | AP per seed | mean | spread (max-min) | vs student | gain > student spread | weights (rule: value) |",
        "|---|---|---|---|---|---|---|",
    ]
    teacher_runs = (payload.get("teacher") or {}).get("runs")
    if teacher_runs:
        lines.append(
            f"| teacher (its recipe, seeds {teacher_runs.get('seeds')}) | {_seeds(teacher_runs)} | "
            f"{_pts(teacher_runs['mean'])} | {_pts(teacher_runs['spread'])} | | | |"
        )
    lines.append(f"| student alone | {_seeds(student)} | {_pts(student['mean'])} | {_pts(student['spread'])} | | | |")
    for group, title in GROUP_TITLES.items():
        for spec, entry in (payload.get(group) or {}).items():
            beats = {True: "yes", False: "no", None: "—"}[entry.get("beats_student")]
            lines.append(
                f"| {spec} ({title}) | {_seeds(entry)} | {_pts(entry['mean'])} | {_pts(entry['spread'])} | "
                f"{_pts(entry.get('vs_student'), sign=True)} | {beats} | {_weights(entry.get('weights'))} |"
            )
    teacher = (payload.get("teacher") or {}).get("ap")
    which = " (the first teacher seed distils)" if teacher_runs else ""
    foot = [f"Teacher AP {_pts(teacher)}{which}." if teacher is not None else ""]
    foot += _store_lines(payload)
    foot.append(f"AP = COCO AP@[.5:.95] x100 on the validation split; seeds {payload.get('seeds')}.")
    foot.append(f"Measured {payload.get('date', '?')[:10]} at commit `{str(payload.get('commit'))[:12]}` on")
    foot.append(f"{payload.get('machine', '?')} by `{payload.get('command', '?')}`.")
    reused = payload.get("reused")
    if reused:
        foot.append(
            f"Rows {', '.join(reused['rows'])} are not retrained: taken from `{Path(reused['file']).name}` (same "
            f"recipe, overrides, seeds and teacher; measured {str(reused.get('date'))[:10]} at commit "
            f"`{str(reused.get('commit'))[:12]}` by `{reused.get('command')}`)."
        )
    return "\n".join(lines) + "\n\n" + " ".join(f for f in foot if f) + "\n"


def _store_lines(payload: dict) -> list[str]:
    """One sentence per store the stored rows trained from: what it keeps and what it weighs."""
    stores: dict[str, tuple[dict, list[str]]] = {}
    for spec, entry in (payload.get("stored") or {}).items():
        if entry.get("store"):
            stores.setdefault(entry["store"]["path"], (entry["store"], []))[1].append(spec)
    out = []
    for info, specs in stores.values():
        enc = info.get("encoding") or {}
        kind = f"{info['policy']} rank {enc['rank']}" if enc.get("rank") else info["policy"]
        if info.get("budget_kb"):  # every level's rank was chosen: list them, not the largest
            kind = f"{info['policy']} fitted to {info['budget_kb']:g} KB, ranks " + ", ".join(
                f"{lv} {r}" for lv, r in info["level_rank"].items()
            )
        elif info.get("level_rank"):
            kind += " (" + ", ".join(f"{lv} {r}" for lv, r in info["level_rank"].items()) + ")"
        if info.get("levels"):
            kind += ", levels " + ", ".join(info["levels"]) + " only"
        if info.get("pool"):
            kind += ", pooled " + ", ".join(f"{lv} 1/{k}" for lv, k in info["pool"].items())
        extra = ", with GKD importance maps" if info.get("importance") else ""
        out.append(
            f"Store for {', '.join(specs)}: {kind} {info.get('value_dtype')}{extra}, {info['bytes_per_view']:.0f} B "
            f"per image-view = {100 * info['ratio_to_dense']:.2f} % of the dense fp16 maps"
            f"{' of those levels' if info.get('levels') else ''} "
            f"(projected at COCO scale: {info['projected_coco_bytes_per_view'] / 1024:.1f} KB per image-view)."
        )
    best = payload.get("best") or {}
    if best:
        on, st = best["online"], best["stored"]
        if best["gap"] < 0:
            verdict = f"the store is ahead by {_pts(-best['gap'])}"
        else:
            within = "within" if best["within_spread"] else "not within"
            verdict = f"gap {_pts(best['gap'])}, {within} the larger seed spread"
        out.append(
            f"Best from the store: {st['method']} {_pts(st['mean'])} (spread {_pts(st['spread'])}); best online: "
            f"{on['method']} {_pts(on['mean'])} (spread {_pts(on['spread'])}); {verdict}."
        )
    return out


def _seeds(entry: dict) -> str:
    return ", ".join(_pts(a) for a in entry.get("ap", [])) or "—"


def _weights(per_seed: list | None) -> str:
    """The weight each method got, as ``rule: value`` (auto weights differ slightly between seeds)."""
    found: dict[str, list[float]] = {}
    rules: dict[str, str] = {}
    for report in per_seed or []:
        for name, w in (report or {}).items():
            found.setdefault(name, []).append(w["weight"])
            rules[name] = w["rule"]
    parts = []
    for name, ws in found.items():
        lo, hi = min(ws), max(ws)
        value = f"{lo:.3g}" if lo == hi else f"{lo:.3g}-{hi:.3g}"
        parts.append(f"{name} {rules[name]}: {value}")
    return "; ".join(parts)


def policy_words(policy: dict) -> str:
    """A store policy in a few words: selector, dtype, ranks (and the budget that chose them), levels."""
    words = f"{policy['name']} {policy.get('value_dtype')}"
    if policy["name"] == "lowrank":
        ranks = policy.get("level_rank") or {}
        words += f" ranks {ranks}" if ranks else f" rank {policy['rank']}"
        words += f", fitted to {policy['budget_kb']:g} KB" if policy.get("budget_kb") else ""
    return words + (f", levels {policy['levels']}" if policy.get("levels") else "")


def speed_table(payload: dict) -> str:
    """Markdown: the side-by-side ratios of ``detkd bench speed`` with the goals they answer to."""
    med, scale = payload["step_seconds_median"], payload["scale"]
    coco = payload.get("projected_coco") or {}
    store = scale["store_policy"]
    rows = [
        (
            "stored step / student-alone step",
            f"**{payload['stored_over_student_step_ratio']:.2f}** ({med['stored']:.3f} s vs {med['student']:.3f} s)",
            "<= 1.05",
        ),
        (
            "online step / student-alone step",
            f"{payload['online_over_student_step_ratio']:.2f} ({med['online']:.3f} s)",
            "",
        ),
        ("stored step / online step", f"{payload['stored_over_online_step_ratio']:.2f}", ""),
    ]
    if "method_over_student_compute_ratio" in payload:  # files written since the bench separates the two
        cmed = payload["compute_step_seconds_median"]
        ratio = payload["method_over_student_compute_ratio"]
        what = "the method's own work: stored / student-alone step on batches in memory, knowledge collated beforehand"
        rows.append((what, f"{ratio:.2f} ({cmed['stored']:.3f} s vs {cmed['student']:.3f} s)", ""))
    rows += [
        (
            "store bytes per image-view / dense fp16 maps",
            f"{100 * payload['store_over_dense_size_ratio']:.2f} % ({payload['store_bytes_per_image_view']:.0f} B vs "
            f"{payload['dense_fp16_bytes_per_image_view']:.0f} B)",
            "<= 5 %",
        ),
        (
            "projected at COCO scale (1333x800), bytes per image-view",
            f"{coco.get('bytes_per_view', 0) / 1024:.1f} KB "
            f"({100 * coco.get('ratio_to_dense', 0):.2f} % of dense fp16)",
            "<= 32 KB",
        ),
        (
            "store build loop / teacher inference (same loader)",
            f"{payload['build_over_teacher_inference_throughput_ratio']:.2f}",
            ">= 0.9",
        ),
        (
            "store reader / what a stored step consumes",
            f"{payload['reader_over_training_consumption_ratio']:.0f}",
            ">= 20",
        ),
    ]
    lines = ["| figure | measured | goal |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    foot = (
        f"Method `{scale['method']}`, store policy `{policy_words(store)}`; "
        f"{scale['images']} synthetic images at {scale['size']} px, batch {scale['batch_size']}, student FCOS "
        f"{scale['student']['backbone']}/FPN-{scale['student']['fpn_channels']}, teacher FCOS "
        f"{scale['teacher']['backbone']}/FPN-{scale['teacher']['fpn_channels']} (random weights), "
        f"{scale['threads']} threads, {scale['workers']} loader workers. Measured {payload.get('date', '?')[:10]} "
        f"at commit `{str(payload.get('commit'))[:12]}` on {payload.get('machine', '?')} by "
        f"`{payload.get('command', '?')}`."
    )
    return "\n".join(lines) + "\n\n" + foot + "\n"


def render(path: str | Path) -> str:
    payload = read_json(path)
    if "student" in payload:
        return accuracy_table(payload)
    if "step_seconds_median" in payload:
        return speed_table(payload)
    raise ValueError(f"{path}: no table renderer for this results file (neither accuracy nor speed figures)")


def update_readme(readme: str | Path, results_dir: str | Path, *, check: bool = False) -> list[str]:
    """Rewrite (or with ``check``, only compare) every marked block; returns the names out of date."""
    readme, results_dir = Path(readme), Path(results_dir)
    text = readme.read_text()
    stale: list[str] = []

    def fill(m: re.Match) -> str:
        body = render(results_dir / m["name"])
        if body != m["body"]:
            stale.append(m["name"])
        return m.group(1) + body + m.group(4)

    new = BLOCK.sub(fill, text)
    if not check and new != text:
        readme.write_text(new)
    return stale
