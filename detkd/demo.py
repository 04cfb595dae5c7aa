"""``detkd demo``: the whole story on the embedded synthetic data, on a CPU.

synthetic data -> teacher -> student alone -> knowledge store (teacher runs once) ->
student distilled from the store (no teacher forward) -> one table.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from detkd.config import validate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoScale:
    train_images: int
    val_images: int
    teacher_epochs: int
    student_epochs: int


FULL = DemoScale(train_images=600, val_images=150, teacher_epochs=12, student_epochs=6)
QUICK = DemoScale(train_images=32, val_images=16, teacher_epochs=1, student_epochs=1)


def _recipe(data: Path, out: Path, *, epochs: int, fpn: int, head: int, seed: int = 0, distill: dict | None = None):
    raw = {
        "name": out.name,
        "data": {"root": str(data), "format": "coco", "sizes": [128], "batch_size": 8, "workers": 2},
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


def run_demo(*, out_dir: str | Path = "runs/demo", quick: bool = False, progress: bool = True) -> dict:
    from detkd.data.formats.detect import open_source
    from detkd.data.synthetic import generate_synthetic
    from detkd.data.views import ViewPolicy
    from detkd.runs import distill, train
    from detkd.store.build import build_store
    from detkd.store.select import SelectionPolicy
    from detkd.store.verify import store_info

    scale = QUICK if quick else FULL
    out = Path(out_dir)
    data = out / "data"
    summary: dict = {"scale": scale.__dict__}
    if not (data / "annotations" / "val.json").is_file():
        log.info("demo 1/5: writing the synthetic shapes data set to %s", data)
        generate_synthetic(data, num_train=scale.train_images, num_val=scale.val_images, image_size=128, seed=0)

    def timed(label: str, fn):
        t0 = time.perf_counter()
        result = fn()
        summary[label] = {"seconds": time.perf_counter() - t0, **_keep(result)}
        return result

    teacher_dir, student_dir, stored_dir = out / "teacher", out / "student", out / "student-stored"
    log.info("demo 2/5: training the teacher (FCOS ResNet-18, FPN-128, 4-conv heads)")
    timed(
        "teacher",
        lambda: _train_or_reuse(
            train, _recipe(data, teacher_dir, epochs=scale.teacher_epochs, fpn=128, head=4), progress
        ),
    )
    log.info("demo 3/5: training the student alone (FCOS ResNet-18, FPN-64, 2-conv heads)")
    timed(
        "student",
        lambda: _train_or_reuse(
            train, _recipe(data, student_dir, epochs=scale.student_epochs, fpn=64, head=2), progress
        ),
    )
    log.info("demo 4/5: building the knowledge store (the teacher runs once, NMS + channel max pooling)")
    store = out / "store"
    source = open_source(data, format="coco", split="train")
    policy = ViewPolicy(sizes=(128,), flip_prob=0.5)
    timed(
        "store",
        lambda: build_store(
            teacher_checkpoint=teacher_dir / "last.pt",
            source=source,
            policy=SelectionPolicy(name="nms-ksd"),
            views=policy.all_views(),
            canvas=policy.canvas,
            out_dir=store,
            progress=progress,
            teacher_ap=summary["teacher"].get("AP"),
        ),
    )
    info = store_info(store)
    summary["store"].update(ratio_to_dense=info["ratio_to_dense"], bytes_per_image_view=info["bytes_per_image_view"])
    log.info("demo 5/5: distilling the student from the store (no teacher model at all)")
    timed(
        "student_stored",
        lambda: _train_or_reuse(
            distill,
            _recipe(
                data,
                stored_dir,
                epochs=scale.student_epochs,
                fpn=64,
                head=2,
                distill={"teacher": str(store), "methods": [{"name": "fitnet"}]},
            ),
            progress,
        ),
    )
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    print(format_demo(summary))
    return summary


def _train_or_reuse(fn, recipe, progress: bool) -> dict:
    metrics = Path(recipe.train.out) / "metrics.json"
    if metrics.is_file() and "AP" in json.loads(metrics.read_text())["last"]:
        log.info("reusing finished run %s", recipe.train.out)
        return json.loads(metrics.read_text())["last"]
    return fn(recipe, resume=(Path(recipe.train.out) / "last.pt").is_file(), progress=progress)


def _keep(result) -> dict:
    if isinstance(result, dict):
        return {k: v for k, v in result.items() if k in ("AP", "AP50", "epoch_seconds")}
    return {}


def format_demo(s: dict) -> str:
    def row(label, key):
        r = s[key]
        return (
            f"| {label} | {100 * r.get('AP', float('nan')):.1f} | {100 * r.get('AP50', float('nan')):.1f} | "
            f"{r.get('epoch_seconds', float('nan')):.1f} | {r['seconds']:.0f} |"
        )

    lines = [
        "| run | AP | AP50 | s/epoch | total s |",
        "|---|---|---|---|---|",
        row("teacher (FCOS R18/FPN-128)", "teacher"),
        row("student alone (FCOS R18/FPN-64)", "student"),
        row("student distilled from the store (fitnet)", "student_stored"),
        f"\nstore: {s['store']['bytes_per_image_view']:.0f} bytes per image-view, "
        f"{100 * s['store']['ratio_to_dense']:.2f} % of the dense fp16 FPN maps; "
        f"built in {s['store']['seconds']:.0f} s",
    ]
    return "\n".join(lines)
