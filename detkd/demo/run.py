"""``detkd demo``: the whole story on the embedded synthetic data, on a CPU.

synthetic data -> teacher -> student alone -> student distilled online (live teacher every step) ->
knowledge store (the teacher runs once) -> student distilled from the store (no teacher forward) ->
table, report.md, demo.png and prediction pictures.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from detkd.config import Recipe, validate
from detkd.demo.report import write_outputs
from detkd.demo.scale import FULL, QUICK, DemoScale, default_out, prepare_data
from detkd.errors import DetkdError

log = logging.getLogger(__name__)

METHOD = "defeat"  # the best measured method on this data (README, measured results)
BATCH_SIZE = 8
PREDICTION_IMAGES = 4
SCORE_THRESH = 0.3  # lowest score drawn in the prediction pictures
# The compact whole-map encoding (rank-16 int4 coefficients on per-level principal bases): every map-based
# method, defeat included, trains from it.
STORE_POLICY = {"name": "lowrank"}
TEACHER_SEED = 0  # the teacher is trained once, whatever the seeds of the students


def _recipe(
    data: Path,
    out: Path,
    *,
    size: int,
    epochs: int,
    fpn: int,
    head: int,
    seed: int,
    distill: dict | None = None,
) -> Recipe:
    raw = {
        "name": out.name,
        "data": {"root": str(data), "format": "coco", "sizes": [size], "batch_size": BATCH_SIZE, "workers": 2},
        "model": {"family": "fcos", "backbone": "resnet18", "fpn_channels": fpn, "head_convs": head},
        "train": {
            "epochs": epochs,
            "lr": 0.02,
            "schedule": "cosine",
            "warmup_iters": 50,
            "seed": seed,
            "out": str(out),
            "eval_every": 0,
        },
    }
    if distill:
        raw["distill"] = distill
    return validate(raw, source="demo")


def run_demo(
    *,
    out_dir: str | Path | None = None,
    quick: bool = False,
    scale: DemoScale | None = None,
    progress: bool = True,
) -> dict:
    """Run (or finish, reusing the finished runs in ``out_dir``) the demo; print and return its summary."""
    from detkd.runs import distill, train

    scale = scale or (QUICK if quick else FULL)
    out = Path(out_dir) if out_dir is not None else default_out(quick=quick)
    data = out / "data"
    log.info("demo 1/6: the synthetic shapes data set in %s", data)
    prepare_data(data, scale)
    previous = _previous_seconds(out / "demo.json")
    size = scale.image_size
    student = {"size": size, "epochs": scale.student_epochs, "fpn": 64, "head": 2}
    rows: dict[str, dict] = {}

    def row(key: str, label: str, runs: list[tuple[Callable, Recipe]], forwards: Callable[[dict], int | None]):
        rows[key] = {"label": label, "runs": []}
        for fn, recipe in runs:
            result = _run_or_reuse(fn, recipe, progress=progress, previous=previous.get(recipe.train.out))
            result["teacher_forwards"] = forwards(result)
            rows[key]["runs"].append(result)

    log.info("demo 2/6: training the teacher (FCOS ResNet-18, FPN-128, 4-conv heads)")
    teacher_dir = out / "teacher"
    teacher = _recipe(data, teacher_dir, size=size, epochs=scale.teacher_epochs, fpn=128, head=4, seed=TEACHER_SEED)
    row("teacher", "teacher (FCOS R18/FPN-128)", [(train, teacher)], lambda r: None)  # training, not counted
    log.info("demo 3/6: training the student alone (FCOS ResNet-18, FPN-64, 2-conv heads), seeds %s", scale.seeds)
    alone = [(train, _recipe(data, out / f"student-seed{s}", seed=s, **student)) for s in scale.seeds]
    row("student", "student alone (FCOS R18/FPN-64)", alone, lambda r: 0)

    log.info("demo 4/6: distilling the student online (%s, the live teacher runs at every step)", METHOD)
    # check_teacher off: the teacher row above measured its AP; evaluating it again would add validation
    # passes to this row's time and teacher forwards.
    online_cfg = {"teacher": str(teacher_dir / "last.pt"), "methods": [{"name": METHOD}], "check_teacher": False}
    online = [
        (distill, _recipe(data, out / f"online-{METHOD}-seed{s}", seed=s, distill=online_cfg, **student))
        for s in scale.seeds
    ]
    # One teacher forward per training image-view the student saw.
    row("online", f"student distilled online ({METHOD})", online, lambda r: r["images_seen"])

    log.info("demo 5/6: building the knowledge store (the teacher runs once; lowrank whole maps)")
    store_dir = out / "store"
    store = _build_or_reuse(
        teacher_dir / "last.pt",
        data,
        store_dir,
        size=size,
        teacher_ap=rows["teacher"]["runs"][0]["AP"],
        progress=progress,
        previous=previous.get(str(store_dir)),
    )
    log.info("demo 6/6: distilling the student from the store (%s, no teacher model at all)", METHOD)
    stored_cfg = {"teacher": str(store_dir), "methods": [{"name": METHOD}]}
    stored = [
        (distill, _recipe(data, out / f"stored-{METHOD}-seed{s}", seed=s, distill=stored_cfg, **student))
        for s in scale.seeds
    ]
    row("stored", f"student distilled from the store ({METHOD})", stored, lambda r: 0)

    summary = {
        "quick": quick,
        "scale": scale.to_dict(),
        "method": METHOD,
        "train_images": scale.train_images,
        "val_images": scale.val_images,
        "rows": rows,
        "store": store,
        "paths": _paths(out, data, store_dir, rows),
    }
    predictions = out / "predictions"
    log.info("writing %d prediction pictures to %s", PREDICTION_IMAGES, predictions)
    _predictions(rows, data, predictions)
    write_outputs(summary, out)
    return summary


def _previous_seconds(path: Path) -> dict[str, float]:
    """Wall times an earlier demo in this folder recorded, by run or store folder (for reused rows)."""
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
        found = {r["dir"]: r["seconds"] for row in old["rows"].values() for r in row["runs"]}
        found[old["store"]["dir"]] = old["store"]["seconds"]
        return found
    except (ValueError, KeyError, TypeError):  # an older demo's layout: time the rows afresh instead
        return {}


def _run_or_reuse(fn: Callable, recipe: Recipe, *, progress: bool, previous: float | None) -> dict:
    """Train (or resume) one run unless it finished at this scale; its numbers, from its metrics.json."""
    run = Path(recipe.train.out)
    metrics_file = run / "metrics.json"
    epochs = recipe.train.epochs
    done = json.loads(metrics_file.read_text())["last"] if metrics_file.is_file() else {}
    finished = done.get("AP") is not None
    if done and (done.get("epoch", 0) > epochs or (finished and done.get("epoch") != epochs)):
        raise DetkdError(
            f"{run}: an earlier demo trained this run for {done.get('epoch')} epochs; this scale asks for {epochs}. "
            "Give another output folder (--out DIR) or delete it"
        )
    t0 = time.perf_counter()
    if finished:
        log.info("reusing finished run %s", run)
    else:
        fn(recipe, resume=(run / "last.pt").is_file(), progress=progress)
    seconds = time.perf_counter() - t0
    metrics = json.loads(metrics_file.read_text())
    last, history = metrics["last"], metrics["history"]
    per_epoch = [h["epoch_seconds"] for h in history if h.get("epoch_seconds") is not None]
    if finished:  # the time recorded when it ran, else the sum of its epochs (without evaluation)
        seconds = previous if previous is not None else sum(per_epoch)
    skipped = sum(h.get("skipped_images", 0) for h in history)
    return {
        "seed": recipe.train.seed,
        "dir": str(run),
        "AP": last.get("AP"),
        "AP50": last.get("AP50"),
        "seconds": seconds,
        "epoch_seconds": sum(per_epoch) / len(per_epoch) if per_epoch else None,
        "epochs": last.get("epoch"),
        "steps": last.get("step"),
        # drop_last batches of one process: every step saw batch_size image-views, less unreadable ones
        "images_seen": last.get("step", 0) * recipe.data.batch_size - skipped,
        "reused": finished,
    }


def _build_or_reuse(
    teacher: Path, data: Path, store: Path, *, size: int, teacher_ap, progress: bool, previous: float | None
) -> dict:
    """Build the lowrank store (a finished one is reused); its size and teacher-forward cost."""
    from detkd.data.formats.detect import open_source
    from detkd.data.views import ViewPolicy
    from detkd.models.checkpoint import file_sha256
    from detkd.runs.setup import resolve_device
    from detkd.store.build import build_store
    from detkd.store.select import SelectionPolicy
    from detkd.store.verify import store_info

    finished = (store / "manifest.json").is_file() and store_info(store)["complete"]
    if finished and store_info(store)["teacher_hash"] != file_sha256(teacher):
        raise DetkdError(
            f"{store}: this store was built from another teacher than {teacher}; delete the store (or give "
            "another output folder, --out DIR) so that the demo builds it from this teacher"
        )
    policy = ViewPolicy(sizes=(size,), flip_prob=0.5)
    t0 = time.perf_counter()
    if finished:
        log.info("reusing finished store %s", store)
    else:
        build_store(
            teacher_checkpoint=teacher,
            source=open_source(data, format="coco", split="train"),
            policy=SelectionPolicy(**STORE_POLICY),
            views=policy.all_views(),
            canvas=policy.canvas,
            out_dir=store,
            progress=progress,
            teacher_ap=teacher_ap,
            device=resolve_device("auto"),
        )
    seconds = time.perf_counter() - t0
    if finished:
        seconds = previous if previous is not None else float("nan")
    info = store_info(store)
    fit_views = min(int((info["encoding"] or {}).get("fit_views", 0)), info["records"])
    return {
        "dir": str(store),
        "policy": info["policy"]["name"],
        "rank": info["policy"]["rank"],
        "value_dtype": info["policy"]["value_dtype"],
        "seconds": seconds,
        "reused": finished,
        "images": info["images"],
        "records": info["records"],
        "views": info["views"],
        # one forward per stored image-view, plus the pass over the first views that fits the bases
        "teacher_forwards": info["records"] + fit_views,
        "fit_views": fit_views,
        "disk_bytes": info["disk_bytes"],
        "bytes_per_image_view": info["bytes_per_image_view"],
        "ratio_to_dense": info["ratio_to_dense"],
        "projected_coco": info["projected_coco"],
    }


def _predictions(rows: dict, data: Path, out: Path) -> list[Path]:
    """Ground truth | student distilled from the store | teacher, on the first validation images."""
    from detkd.runs import visualize_checkpoint

    student = Path(rows["stored"]["runs"][0]["dir"]) / "last.pt"
    teacher = Path(rows["teacher"]["runs"][0]["dir"]) / "last.pt"
    written = visualize_checkpoint(
        student,
        data,
        count=PREDICTION_IMAGES,
        out_dir=out,
        compare=teacher,
        format="coco",
        score_thresh=SCORE_THRESH,
    )
    # Both checkpoints are called last.pt: name the panels by what they are.
    (out / "README.txt").write_text(
        "Panels, left to right: ground truth (green), "
        f"{rows['stored']['label']}, seed {rows['stored']['runs'][0]['seed']} (red; {student}), "
        f"teacher (blue; {teacher}). Detections with score >= {SCORE_THRESH}, validation split.\n"
    )
    return written


def _paths(out: Path, data: Path, store: Path, rows: dict) -> dict:
    return {
        "out": str(out),
        "data": str(data),
        "store": str(store),
        "runs": {key: [r["dir"] for r in row["runs"]] for key, row in rows.items()},
        "report": str(out / "report.md"),
        "plot": str(out / "demo.png"),
        "summary": str(out / "demo.json"),
        "predictions": str(out / "predictions"),
    }
