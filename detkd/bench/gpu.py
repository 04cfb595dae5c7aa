"""``detkd bench gpu``: the CUDA path checked and the store's speed-up measured on one GPU, in one call.

Three parts, each judged and recorded with its numbers in one strict-JSON file (no NaN: null):

1. amp: float16 autocast + GradScaler against float32 (``detkd.bench.amp_check``).
2. torchrun: ``torchrun --nproc-per-node 1`` (NCCL on CUDA, gloo on the CPU) for a short stored and a
   short online distillation through the CLI.
3. speed: ``detkd bench speed`` at GPU scale for FitNet (compact nms-ksd store) and DeFeat (dense
   store), against the targets in ``TARGETS``.

``--cpu`` runs the same code paths at a toy scale (64 px, tiny models, gloo, AMP forced onto the CPU)
in well under a minute: the dry run that proves the script before a GPU is spent on it. A part that
raises is recorded as failed with its error, and the other parts still run.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from detkd.bench.amp_check import AmpScale, run_amp_check
from detkd.bench.results import git_commit, write_json
from detkd.bench.speed import SpeedScale, gpu_scale, run_speed
from detkd.models.builders import DetectorSpec

# figure -> (comparison, target): the issue's goals for the GPU scale.
TARGETS: dict[str, tuple[str, float]] = {
    "stored_over_student_step_ratio": ("<=", 1.05),
    "online_over_stored_step_ratio": (">=", 1.3),
    "build_over_teacher_inference_throughput_ratio": (">=", 0.9),
    "stored_over_online_peak_memory_ratio": ("<", 1.0),  # the teacher no longer occupies the device
}
SPEED_METHODS = ("fitnet", "defeat")
PARTS = ("amp", "torchrun", "speed")


def judge(value: float | None, op: str, target: float) -> bool | None:
    """True/False against the target; None when the figure was not measured (e.g. GPU memory on the CPU)."""
    if value is None or not math.isfinite(value):
        return None if value is None else False
    return {"<=": value <= target, ">=": value >= target, "<": value < target}[op]


def speed_checks(results: dict) -> dict:
    """The judged figures of one ``run_speed`` result, each with its value, target and verdict."""
    med = results["step_seconds_median"]
    peaks = results.get("peak_memory_bytes")
    values = {
        "stored_over_student_step_ratio": results["stored_over_student_step_ratio"],
        "online_over_stored_step_ratio": med["online"] / med["stored"],
        "build_over_teacher_inference_throughput_ratio": results["build_over_teacher_inference_throughput_ratio"],
        "stored_over_online_peak_memory_ratio": peaks["stored"] / peaks["online"] if peaks else None,
    }
    return {
        k: {"value": v, "op": TARGETS[k][0], "target": TARGETS[k][1], "passed": judge(v, *TARGETS[k])}
        for k, v in values.items()
    }


def part_passed(checks: dict) -> bool:
    """Every measured check passed (unmeasured ones, None, neither pass nor fail the part)."""
    verdicts = [c["passed"] for c in checks.values()]
    return all(v is not False for v in verdicts) and any(v is True for v in verdicts)


def _scales(cpu: bool) -> dict:
    if cpu:
        tiny = DetectorSpec(family="fcos", backbone="resnet18", num_classes=6, fpn_channels=16, head_convs=1)
        wide = DetectorSpec(family="fcos", backbone="resnet18", num_classes=6, fpn_channels=32, head_convs=1)
        return {
            # float16 kernels are slow on CPUs: the AMP dry run uses 32 px canvases.
            "amp": AmpScale(size=32, batch_size=2, images=2, student=tiny),  # 1 step per epoch
            "speed": SpeedScale(8, 64, 4, 1, 1, tiny, wide, amp=False),  # 1 warm-up + 1 timed step per mode
            "amp_images": 4,  # torchrun: 2 steps of batch 2
            "torchrun": {"size": 64, "batch_size": 2, "fpn": 16, "head_convs": 1, "workers": 0},
            "workers": 0,
        }
    shapes = DetectorSpec(family="fcos", backbone="resnet18", num_classes=6, fpn_channels=64, head_convs=2)
    workers = max(2, min(12, (os.cpu_count() or 4) - 2))
    return {
        "amp": AmpScale(size=128, batch_size=8, images=64, student=shapes),  # the shapes student, 8 steps/epoch
        "speed": gpu_scale(),
        "amp_images": 64,
        "torchrun": {"size": 128, "batch_size": 8, "fpn": 64, "head_convs": 2, "workers": 4},
        "workers": workers,
    }


def environment(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine()),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
    }


def _timed(name: str, fn, log: list[str]) -> dict:
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # one broken part must not cost the others' numbers on a scarce device
        result = {"passed": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    result.setdefault("seconds", time.perf_counter() - t0)
    log.append(f"{name}: {'PASSED' if result['passed'] else 'FAILED'} in {result['seconds']:.1f} s")
    print(log[-1], flush=True)
    return result


def torchrun_part(*, work: Path, data_dir: Path, cfg: dict, device: torch.device) -> dict:
    """Build a random-weight teacher and its store, then one stored and one online distillation under
    ``torchrun --nproc-per-node 1``; each must exit 0, train, and report the expected backend."""
    from detkd.data.formats.detect import open_source
    from detkd.data.views import ViewPolicy
    from detkd.models.builders import build_detector
    from detkd.models.checkpoint import save_checkpoint
    from detkd.store.build import build_store
    from detkd.store.select import SelectionPolicy

    source = open_source(data_dir, format="coco", split="train")
    spec = dict(family="fcos", backbone="resnet18", fpn_channels=cfg["fpn"], head_convs=cfg["head_convs"])
    torch.manual_seed(0)
    teacher = build_detector(DetectorSpec(num_classes=source.num_classes, **{**spec, "fpn_channels": 2 * cfg["fpn"]}))
    ckpt = work / "teacher.pt"
    save_checkpoint(ckpt, teacher, class_names=source.class_names)
    store = work / "store"
    if not (store / "manifest.json").is_file():
        build_store(
            teacher_checkpoint=ckpt,
            source=source,
            policy=SelectionPolicy(name="nms-ksd"),
            views=ViewPolicy(sizes=(cfg["size"],), flip_prob=0.5).all_views(),
            canvas=cfg["size"],
            out_dir=store,
            batch_size=cfg["batch_size"],
            progress=False,
            device=device,
        )
    recipe = work / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "data": {
                    "root": str(data_dir),
                    "sizes": [cfg["size"]],
                    "batch_size": cfg["batch_size"],
                    "workers": cfg["workers"],
                },
                "model": spec,
                "train": {"epochs": 1, "warmup_iters": 2, "device": device.type, "eval_every": 1},
                "distill": {"check_teacher": False},
            }
        )  # JSON is YAML
    )
    backend = "nccl" if device.type == "cuda" else "gloo"
    env = {**os.environ, "OMP_NUM_THREADS": "1" if device.type == "cpu" else os.environ.get("OMP_NUM_THREADS", "4")}
    procs = {}
    t0 = time.perf_counter()
    # Both launches at once (each --standalone, its own rendezvous): interpreter start-up is most of their cost.
    for mode, teacher_path in (("stored", store), ("online", ckpt)):
        out = work / f"student-{mode}"
        shutil.rmtree(out, ignore_errors=True)  # a rerun in the same --out starts afresh (no --resume)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--standalone", "-m", "detkd"]
        cmd += ["distill", str(recipe), "method=fitnet", f"teacher={teacher_path}", f"train.out={out}", "--no-progress"]
        procs[mode] = (out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    runs = {}
    for mode, (out, proc) in procs.items():
        try:
            text, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            text = (proc.communicate()[0] or "") + "\n[killed after 300 s]"
        metrics_file = out / "metrics.json"
        metrics = json.loads(metrics_file.read_text())["last"] if metrics_file.is_file() else {}
        runs[mode] = {
            "returncode": proc.returncode,
            "backend_seen": f"distributed: backend {backend}, rank 0 of 1" in text,
            "images_per_second": metrics.get("images_per_second"),
            "AP": metrics.get("AP"),
            "seconds": time.perf_counter() - t0,
            "output_tail": text[-1500:] if proc.returncode else "",
        }
        ok = proc.returncode == 0 and runs[mode]["backend_seen"] and metrics.get("images_per_second")
        runs[mode]["passed"] = bool(ok)
    return {"passed": all(r["passed"] for r in runs.values()), "backend": backend, "runs": runs}


def speed_part(*, work: Path, data_dir: Path, scale: SpeedScale, workers: int, device: torch.device) -> dict:
    methods = {}
    for method in SPEED_METHODS:
        t0 = time.perf_counter()
        results = run_speed(
            out_dir=work / method, method=method, workers=workers, scale=scale, device=device, data_dir=data_dir
        )
        checks = speed_checks(results)
        methods[method] = {
            "passed": part_passed(checks),
            "checks": checks,
            "seconds": time.perf_counter() - t0,
            "results": {k: v for k, v in results.items() if k not in ("step_seconds_all",)},
        }
    return {"passed": all(m["passed"] for m in methods.values()), "targets": TARGETS, "methods": methods}


def run_gpu_check(*, out_json: str | Path, work_dir: str | Path, cpu: bool, parts: tuple[str, ...] = PARTS) -> dict:
    """Run the parts, write ``out_json`` (strict JSON) and return the report."""
    from detkd.data.synthetic import generate_synthetic

    if not cpu and not torch.cuda.is_available():
        raise RuntimeError("detkd bench gpu: no CUDA device is visible (use --cpu for the CPU dry run)")
    device = torch.device("cpu") if cpu else torch.device("cuda", 0)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = _scales(cpu)
    gen_workers = max(1, (os.cpu_count() or 2) - 1)
    t0 = time.perf_counter()
    report: dict = {"mode": "cpu" if cpu else "gpu", "environment": environment(device), "parts": {}}
    log: list[str] = []
    small, big = work / "data-small", work / "data-speed"
    if "amp" in parts or "torchrun" in parts:  # shared shapes data, at the torchrun size
        if not (small / "annotations" / "train.json").is_file():
            size = cfg["torchrun"]["size"]
            generate_synthetic(small, num_train=cfg["amp_images"], num_val=4, image_size=size, workers=gen_workers)

    def save(name: str, result: dict) -> None:  # after every part: a run cut short keeps what it measured
        report["parts"][name] = result
        report["passed"] = all(p["passed"] for p in report["parts"].values()) and len(report["parts"]) == len(parts)
        report["seconds"] = time.perf_counter() - t0
        write_json(out_json, report)

    if "amp" in parts:
        amp_scale = cfg["amp"]
        shutil.rmtree(work / "amp", ignore_errors=True)
        save(
            "amp",
            _timed(
                "amp", lambda: run_amp_check(data_dir=small, out_dir=work / "amp", scale=amp_scale, device=device), log
            ),
        )
    if "torchrun" in parts:
        tr = cfg["torchrun"]
        save(
            "torchrun",
            _timed(
                "torchrun", lambda: torchrun_part(work=work / "torchrun", data_dir=small, cfg=tr, device=device), log
            ),
        )
    if "speed" in parts:
        scale = cfg["speed"]
        if not (big / "annotations" / "train.json").is_file():
            generate_synthetic(big, num_train=scale.images, num_val=4, image_size=scale.size, workers=gen_workers)
        save(
            "speed",
            _timed(
                "speed",
                lambda: speed_part(
                    work=work / "speed", data_dir=big, scale=scale, workers=cfg["workers"], device=device
                ),
                log,
            ),
        )
    return report


def format_report(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"detkd bench gpu ({report['mode']}): {env['device']}, torch {env['torch']}, CUDA {env['cuda']}, "
        f"commit {env['commit']}, {env['date']}",
    ]
    parts = report["parts"]
    if "amp" in parts and "checks" in parts["amp"]:
        c = parts["amp"]["checks"]
        lines.append(
            f"  amp: step-1 rel diff {c['close']['step1_rel_diff']:.2e}, first {c['close']['first_steps']} steps max "
            f"{c['close']['first_steps_max_rel_diff']:.2e}, skipped {c['finite']['scaler_skipped_steps']}, resume "
            f"scales equal {c['resume']['scales_equal']}, loss rel diff {c['resume']['loss_max_rel_diff']}"
        )
    if "torchrun" in parts and "runs" in parts["torchrun"]:
        for mode, r in parts["torchrun"]["runs"].items():
            lines.append(f"  torchrun {mode}: rc {r['returncode']}, {parts['torchrun']['backend']} {r['backend_seen']}")
    for method, m in parts.get("speed", {}).get("methods", {}).items():
        for name, c in m["checks"].items():
            shown = "n/a" if c["value"] is None else f"{c['value']:.3f}"
            lines.append(f"  speed {method}: {name} {shown} (target {c['op']} {c['target']}): {c['passed']}")
    for name, p in parts.items():
        lines.append(f"{name}: {'PASSED' if p['passed'] else 'FAILED'}" + (f" ({p['error']})" if "error" in p else ""))
    lines.append(f"all parts passed: {report['passed']} ({report['seconds']:.0f} s)")
    return "\n".join(lines)
