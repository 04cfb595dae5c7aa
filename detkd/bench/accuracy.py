"""``detkd bench accuracy``: every method against the student alone, same schedule, several seeds.

Each row is a real training run (recipe + overrides) whose metrics come from its own
evaluation; the table reports mean and spread (max - min) of AP over seeds, and wall time
per epoch. Runs already present in the output directory are reused, so an interrupted
benchmark resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

from detkd.bench.results import ap_summary, provenance, write_json
from detkd.config import load_recipe
from detkd.jsonio import dumps

log = logging.getLogger(__name__)


KINDS = {"online": "methods", "stored": "stored", "selected online": "selected"}  # row kind -> JSON group


@dataclass(frozen=True)
class Row:
    name: str  # e.g. "student", "fitnet (online)", "fitnet (stored)", "ssim:paper (online)"
    method: str | None  # METHOD[:WEIGHT]; None = the student alone
    teacher: str | None  # checkpoint or store directory
    overrides: tuple[str, ...] = ()  # row-specific recipe overrides
    kind: str = "online"  # student | online | stored | selected online


def method_entry(spec: str) -> str:
    """``ssim`` -> ``{name: ssim}``; ``ssim:paper`` / ``ssim:2.5`` also set the weight (YAML flow mapping)."""
    from detkd.commands.distill import method_weight
    from detkd.distill.base import METHODS
    from detkd.errors import ConfigError

    name, _, weight = spec.partition(":")
    if name not in METHODS:
        raise ConfigError(f"bench accuracy: unknown method {spec!r}; available: {', '.join(METHODS.names())}")
    return f"{{name: {name}, weight: {method_weight(weight, item=spec)}}}" if weight else f"{{name: {name}}}"


def run_dir_for(row: Row, seed: int, out_dir: Path) -> Path:
    return out_dir / f"{row.name.replace(' ', '_').replace('(', '').replace(')', '')}-seed{seed}"


def finished_run(run_dir: Path) -> dict | None:
    """The final metrics of a run that finished and was evaluated, else None."""
    done = run_dir / "metrics.json"
    last = json.loads(done.read_text())["last"] if done.is_file() else {}
    return last if "AP" in last else None


def run_row(row: Row, *, recipe_path: str, seed: int, out_dir: Path, overrides: list[str]) -> dict:
    from detkd.runs import distill, train

    run_dir = run_dir_for(row, seed, out_dir)
    finished = finished_run(run_dir)
    if finished is not None:
        return finished
    extra = [f"train.seed={seed}", f"train.out={run_dir}", *overrides, *row.overrides]
    if row.method is not None:
        extra += [f"distill.teacher={row.teacher}", f"distill.methods=[{method_entry(row.method)}]"]
    recipe = load_recipe(recipe_path, extra)
    resume = (run_dir / "last.pt").is_file()
    if row.method is None:
        return train(recipe, resume=resume, progress=False)
    return distill(recipe, resume=resume, progress=False)


def summarise(results: dict[str, list[dict]]) -> list[dict]:
    table = []
    for name, runs in results.items():
        aps = [r["AP"] for r in runs if "AP" in r]
        secs = [r["epoch_seconds"] for r in runs if "epoch_seconds" in r]
        ap50 = [r["AP50"] for r in runs if "AP50" in r]  # rows reused from a results file have AP only
        table.append(
            {
                "row": name,
                "seeds": len(aps),
                "AP_mean": statistics.mean(aps) if aps else None,
                "AP_spread": (max(aps) - min(aps)) if len(aps) > 1 else None,
                "AP_all": aps,
                "AP50_mean": statistics.mean(ap50) if ap50 else None,
                "epoch_seconds_mean": statistics.mean(secs) if secs else None,
            }
        )
    return table


def format_table(table: list[dict], *, teacher_ap: float | None = None) -> str:
    """Markdown table in AP points (x100); "vs student" is the difference of means to the student row."""
    base = next((t["AP_mean"] for t in table if t["row"] == "student"), None)

    def pts(v: float | None, sign: bool = False) -> str:
        return "—" if v is None else (f"{100 * v:+.1f}" if sign else f"{100 * v:.1f}")

    lines = [
        "| run | seeds | AP per seed | AP mean | AP spread (max-min) | vs student | AP50 mean | s/epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        per_seed = ", ".join(pts(a) for a in t.get("AP_all", [])) or "—"
        gain = None if base is None or t["AP_mean"] is None or t["row"] == "student" else t["AP_mean"] - base
        secs = "—" if t["epoch_seconds_mean"] is None else f"{t['epoch_seconds_mean']:.0f}"
        lines.append(
            f"| {t['row']} | {t['seeds']} | {per_seed} | {pts(t['AP_mean'])} | {pts(t['AP_spread'])} | "
            f"{pts(gain, sign=True)} | {pts(t['AP50_mean'])} | {secs} |"
        )
    if teacher_ap is not None:
        lines.append(f"\nteacher AP {100 * teacher_ap:.1f} (AP in points, x100)")
    return "\n".join(lines)


def stores_by_method(store: str | dict[str, str] | None) -> dict[str, str]:
    """``--store`` as {method name or "*": store directory}: one store for every method, or per method."""
    if store is None:
        return {}
    return {"*": store} if isinstance(store, str) else dict(store)


def store_for(spec: str, stores: dict[str, str]) -> str | None:
    name = spec.partition(":")[0]
    return stores.get(name, stores.get("*"))


def run_accuracy(
    *,
    recipe: str,
    teacher: str,
    store: str | dict[str, str] | None,
    methods: list[str],
    seeds: list[int],
    out_dir: str | Path,
    overrides: list[str] | None = None,
    selected: bool = False,
    json_path: str | Path | None = None,
    reuse: str | Path | None = None,
    only: list[str] | None = None,
    teacher_runs: list[str] | None = None,
) -> list[dict]:
    """``store``: one store directory for every method's stored row, or {method or "*": directory}
    (e.g. GKD from a store with importance maps). ``selected`` adds "M (selected online)" rows: the
    store's selection applied to the live teacher, i.e. the stored loss without the store (tells
    selection from storage effects). ``reuse``: take the student and online rows from that earlier
    results file instead of training them (checked comparable first: ``detkd.bench.reuse``). ``only``:
    train just these row kinds (student, online, stored, selected), e.g. to split one benchmark over
    several processes; the other rows are read from their finished run directories, and a row with
    no finished seed is left out. ``teacher_runs``: checkpoints of the teacher's recipe at other
    seeds, recorded with the distilling teacher as the teacher's row (``teacher.runs``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for m in methods:  # a typo fails now, not after the student's run
        method_entry(m)
    rows = [Row("student", None, None, kind="student")]
    rows += [Row(f"{m} (online)", m, teacher) for m in methods]
    stores = stores_by_method(store)
    rows += [Row(f"{m} (stored)", m, store_for(m, stores), kind="stored") for m in methods if store_for(m, stores)]
    if selected:
        if not stores:
            raise ValueError("selected rows take the selection policy of a store: give --store")
        from detkd.store.reader import StoreReader

        for m in methods:
            if store_for(m, stores):
                policy = json.dumps(StoreReader(store_for(m, stores)).policy.to_dict())
                selection = (f"distill.online_selection={policy}",)
                rows.append(Row(f"{m} (selected online)", m, teacher, selection, kind="selected online"))
    reused: dict[str, list[dict]] = {}
    source = None
    if reuse is not None:
        from detkd.bench.reuse import reused_results

        reused, source = reused_results(
            reuse, recipe=recipe, teacher=teacher, seeds=seeds, overrides=list(overrides or []), methods=methods
        )
        log.info("bench accuracy: rows %s taken from %s", ", ".join(sorted(reused)), reuse)
    results: dict[str, list[dict]] = {}
    for seed in seeds:  # seed-major: a partial benchmark already has every row once
        for row in rows:
            if row.name in reused:
                results.setdefault(row.name, []).append(reused[row.name][seeds.index(seed)])
                continue
            if only and row.kind.split()[0] not in only:
                finished = finished_run(run_dir_for(row, seed, out))
                results.setdefault(row.name, []).append(finished or {"error": "not run (--only)", "not_run": True})
                continue
            log.info("bench accuracy: %s, seed %d", row.name, seed)
            try:
                metrics = run_row(row, recipe_path=recipe, seed=seed, out_dir=out, overrides=overrides or [])
            except Exception as exc:  # one method failing must not lose the others' numbers
                log.error("%s seed %d failed: %s", row.name, seed, exc)
                metrics = {"error": str(exc)}
            results.setdefault(row.name, []).append(metrics)
            table = summarise(results)
            (out / "accuracy.json").write_text(dumps({"table": table, "runs": results}, indent=2, default=str))
            (out / "accuracy.md").write_text(format_table(table))
    results = {name: runs for name, runs in results.items() if not all(r.get("not_run") for r in runs)}
    if json_path is not None:
        if "student" not in results:
            from detkd.errors import DetkdError

            raise DetkdError(f"no finished student run in {out}: the results file compares every row with it")
        payload = accuracy_payload(rows, results, recipe=recipe, teacher=teacher, store=store, seeds=seeds)
        if teacher_runs:
            payload["teacher"]["runs"] = teacher_seed_runs([teacher, *teacher_runs])
        payload["overrides"] = list(overrides or [])
        if source is not None:
            payload["reused"] = source
        write_json(json_path, payload)
    return summarise(results)


def accuracy_payload(
    rows: list[Row],
    results: dict[str, list[dict]],
    *,
    recipe: str,
    teacher: str,
    store: str | dict[str, str] | None,
    seeds: list[int],
) -> dict:
    """The committed-results schema: provenance, ``student`` and ``methods.<spec>`` (plus ``stored`` /
    ``selected`` groups when run), each ``{"ap": [AP x100 per seed], "mean", "spread", ...}``.

    ``beats_student``: the mean exceeds the student's mean by more than the student's spread
    (the project's rule for claiming a gain). A stored entry also names its store's size (``store``:
    bytes per view, ratio to dense fp16 maps, projected COCO-scale bytes) and ``vs_online``; with both
    groups, ``best`` compares the best stored method with the best online one (``within_spread``: the
    gap is at most the larger of their two seed spreads).
    """
    from detkd.bench.reuse import teacher_identity

    teacher_sha, teacher_ap = teacher_identity(teacher)
    student = ap_summary([r.get("AP") for r in results["student"]])
    payload: dict = {
        **provenance(),
        "recipe": recipe,
        "seeds": list(seeds),
        "teacher": {"checkpoint": teacher, "ap": teacher_ap, "sha256": teacher_sha},
        "store": store,
        "student": {**student, "epoch_seconds": _mean_of(results["student"], "epoch_seconds")},
    }
    for row in rows[1:]:
        if row.name not in results:
            continue
        runs = results[row.name]
        entry = ap_summary([r.get("AP") for r in runs])
        gain = None if entry["mean"] is None or student["mean"] is None else round(entry["mean"] - student["mean"], 2)
        entry.update(
            vs_student=gain,
            beats_student=None if gain is None or student["spread"] is None else gain > student["spread"],
            epoch_seconds=_mean_of(runs, "epoch_seconds"),
            weights=[r.get("distill_weights") for r in runs],
            errors=[r["error"] for r in runs if "error" in r],
        )
        if row.kind == "stored":
            entry["store"] = store_summary(row.teacher)
            online = payload.get("methods", {}).get(row.method, {}).get("mean")
            entry["vs_online"] = None if online is None or entry["mean"] is None else round(entry["mean"] - online, 2)
        payload.setdefault(KINDS[row.kind], {})[row.method] = entry
    if payload.get("stored") and payload.get("methods"):
        payload["best"] = best_comparison(payload["methods"], payload["stored"])
    return payload


def teacher_seed_runs(checkpoints: list[str]) -> dict:
    """The teacher's row: each checkpoint's AP as evaluated when it was saved, and their spread.
    Refused when the checkpoints were not trained by one recipe (same architecture and data)."""
    from detkd.errors import DetkdError
    from detkd.models.checkpoint import read_checkpoint

    aps, seeds, recipes = [], [], []
    for path in checkpoints:
        ckpt = read_checkpoint(path)
        recipe = {k: dict(v) for k, v in ((ckpt.get("run") or {}).get("recipe") or {}).items() if isinstance(v, dict)}
        train = recipe.get("train", {})
        seeds.append(train.get("seed"))
        for key in ("seed", "out", "eval_every", "log_every", "device"):  # differ by design or change nothing
            train.pop(key, None)
        recipes.append(recipe)
        aps.append((ckpt.get("metrics") or {}).get("AP"))
    for path, recipe in zip(checkpoints[1:], recipes[1:], strict=True):
        if recipe != recipes[0]:
            raise DetkdError(f"--teacher-runs: {path} was trained by another recipe than {checkpoints[0]}")
    return {"checkpoints": [str(c) for c in checkpoints], "seeds": seeds, **ap_summary(aps)}


def store_summary(path: str) -> dict:
    """What a results file records of a store: its policy, encoding and size (measured and projected)."""
    from detkd.store.verify import store_info

    info = store_info(path)
    return {
        "path": str(path),
        "policy": info["policy"].get("name"),
        "value_dtype": info["policy"].get("value_dtype"),
        **({"level_rank": info["policy"]["level_rank"]} if info["policy"].get("level_rank") else {}),
        **({"pool": info["policy"]["pool"]} if info["policy"].get("pool") else {}),
        **({"budget_kb": info["policy"]["budget_kb"]} if info["policy"].get("budget_kb") else {}),
        **({"levels": info["policy"]["levels"]} if info["policy"].get("levels") else {}),
        "encoding": info["encoding"] or None,
        "importance": bool(info["preprocessing"].get("importance")),
        "bytes_per_view": round(info["bytes_per_image_view"], 1),
        "dense_fp16_bytes_per_view": info["dense_fp16_bytes_per_view"],
        "ratio_to_dense": round(info["ratio_to_dense"], 5),
        "projected_coco_bytes_per_view": info["projected_coco"]["bytes_per_view"],
    }


def best_comparison(online: dict, stored: dict) -> dict:
    """The best stored method against the best online one, by mean AP."""

    def best(group: dict) -> tuple[str, dict] | None:
        scored = [(k, e) for k, e in group.items() if e.get("mean") is not None]
        return max(scored, key=lambda item: item[1]["mean"]) if scored else None

    b_on, b_st = best(online), best(stored)
    if b_on is None or b_st is None:
        return {}
    gap = round(b_on[1]["mean"] - b_st[1]["mean"], 2)
    allowed = max(b_on[1]["spread"] or 0.0, b_st[1]["spread"] or 0.0)
    return {
        "online": {"method": b_on[0], "mean": b_on[1]["mean"], "spread": b_on[1]["spread"]},
        "stored": {"method": b_st[0], "mean": b_st[1]["mean"], "spread": b_st[1]["spread"]},
        "gap": gap,
        "within_spread": gap <= allowed,
    }


def _mean_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return round(statistics.mean(values), 2) if values else None
