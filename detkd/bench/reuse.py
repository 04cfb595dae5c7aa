"""Rows of an earlier results file reused by ``detkd bench accuracy --reuse FILE``.

A stored-knowledge benchmark compares new rows (students from a store) with rows that are
already measured and committed: the student alone and the methods online, same teacher, same
recipe, same seeds. Retraining those is hours on a CPU. ``--reuse`` takes them from the file
instead, only after checking that they are comparable: same recipe and overrides (as the file
records them, or read back from its command for files older than that field; overrides of the
``distill`` section alone, e.g. ``distill.levels``, still let the student row be reused, not the
online ones), every requested seed present, and the same teacher (its
sha256 when the file records one, else its recorded AP, which a retrained teacher reproduces
only when training is bit-identical). The new results file names the source and its
provenance, so a reader sees which rows were measured when.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from detkd.bench.results import read_json
from detkd.errors import DetkdError

log = logging.getLogger(__name__)


class ReuseError(DetkdError):
    """The earlier results file does not describe the same benchmark."""


def source_overrides(src: dict) -> list[str]:
    """The recipe overrides an earlier results file was measured with: recorded since the field
    existed, else read back from its command (the tokens that set a recipe section, e.g.
    ``train.epochs=6``; ``--store METHOD=DIR`` values name no section)."""
    if src.get("overrides") is not None:
        return list(src["overrides"])
    from detkd.config import Recipe

    sections = set(Recipe.model_fields)
    tokens = shlex.split(src["command"])
    return [t for t in tokens if "=" in t and not t.startswith("-") and t.split("=")[0].split(".")[0] in sections]


def student_overrides(overrides: list[str]) -> list[str]:
    """The overrides a student-alone run sees: all but the ``distill`` section's, which only distillation reads."""
    return [o for o in overrides if o.split("=")[0].split(".")[0] != "distill"]


def teacher_identity(teacher: str | Path) -> tuple[str, float | None]:
    """(sha256, AP x100 as recorded in the checkpoint, rounded as results files round it)."""
    from detkd.models.checkpoint import read_checkpoint
    from detkd.models.files import file_sha256

    ap = (read_checkpoint(teacher).get("metrics") or {}).get("AP")
    return file_sha256(teacher), None if ap is None else round(100 * ap, 2)


def reused_results(
    path: str | Path,
    *,
    recipe: str,
    teacher: str | Path,
    seeds: list[int],
    overrides: list[str],
    methods: list[str],
) -> tuple[dict[str, list[dict]], dict]:
    """``({row name: [run result per requested seed]}, provenance of the source)`` for the student
    row and each requested method's online row the file holds; raises ReuseError when the file is
    not comparable."""
    src = read_json(path)
    where = f"--reuse {path}"
    if not all(key in src for key in ("command", "recipe", "seeds", "student")):
        raise ReuseError(f"{where}: not a `detkd bench accuracy` results file (no command, recipe or student row)")
    src_recipe, src_overrides = src["recipe"], source_overrides(src)
    if Path(src_recipe).name != Path(recipe).name:
        raise ReuseError(f"{where}: measured with recipe {src_recipe}, this benchmark uses {recipe}")
    if sorted(student_overrides(src_overrides)) != sorted(student_overrides(overrides)):
        raise ReuseError(f"{where}: measured with overrides {src_overrides}, this benchmark uses {list(overrides)}")
    same_distillation = sorted(src_overrides) == sorted(overrides)
    if not same_distillation:
        log.info(
            "%s: distill overrides differ (%s, here %s): reusing the student row alone", where, src_overrides, overrides
        )
    missing = [s for s in seeds if s not in src["seeds"]]
    if missing:
        raise ReuseError(f"{where}: holds seeds {src['seeds']}, not {missing}")
    sha, ap = teacher_identity(teacher)
    recorded = src.get("teacher") or {}
    if recorded.get("sha256"):
        if recorded["sha256"] != sha:
            there = recorded["sha256"][:12]
            raise ReuseError(f"{where}: measured with another teacher (sha256 {there}, {teacher} is {sha[:12]})")
    elif recorded.get("ap") is None or recorded["ap"] != ap:
        raise ReuseError(f"{where}: teacher AP {recorded.get('ap')} there, {ap} for {teacher}: not the same teacher")
    else:
        log.warning("%s records no teacher sha256: the teacher is matched by its AP (%s) only", where, ap)

    def runs(entry: dict) -> list[dict]:
        out = []
        for seed in seeds:
            i = src["seeds"].index(seed)
            ap_i = entry["ap"][i]
            run: dict = {"AP": ap_i / 100.0} if ap_i is not None else {"error": f"failed in {path}"}
            if entry.get("epoch_seconds") is not None:
                run["epoch_seconds"] = entry["epoch_seconds"]  # the file keeps the mean over seeds only
            weights = entry.get("weights")
            if weights:
                run["distill_weights"] = weights[i]
            out.append(run)
        return out

    results = {"student": runs(src["student"])}
    for method in methods if same_distillation else []:
        if method in src.get("methods", {}):
            results[f"{method} (online)"] = runs(src["methods"][method])
    source = {key: src.get(key) for key in ("command", "commit", "date", "machine")}
    return results, {"file": str(path), **source, "rows": sorted(results)}
