"""``detkd bench speed``: stored vs online distillation vs the student alone, side by side.

Every figure is a ratio of two measurements taken in the same process, interleaved in rounds
(student, online, stored, student, ...), so machine load drifts affect all modes alike.
Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from detkd.bench.results import provenance, write_json
from detkd.bench.steps import compute_step_times, peak_memory, step_times, sync
from detkd.bench.tables import policy_words
from detkd.data.formats.detect import open_source
from detkd.data.loader import ViewedDataset, build_loader
from detkd.data.synthetic import generate_synthetic
from detkd.data.views import ViewPolicy
from detkd.distill.base import METHODS
from detkd.errors import ConfigError
from detkd.models.builders import DetectorSpec, build_detector
from detkd.models.checkpoint import save_checkpoint
from detkd.store.build import build_store
from detkd.store.format import parse_key
from detkd.store.reader import StoreReader
from detkd.store.select import SelectionPolicy
from detkd.store.verify import store_info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedScale:
    images: int
    size: int
    batch_size: int
    rounds: int
    steps_per_round: int
    student: DetectorSpec
    teacher: DetectorSpec
    amp: bool = False  # steps under float16 autocast + GradScaler, as the trainer runs them on CUDA


def cpu_scale(quick: bool) -> SpeedScale:
    """DESIGN.md's CPU benchmark scale: FCOS R18/FPN-64 student, R50/FPN-128 teacher, 128 px."""
    student = DetectorSpec(family="fcos", backbone="resnet18", num_classes=6, fpn_channels=64, head_convs=2)
    teacher = DetectorSpec(family="fcos", backbone="resnet50", num_classes=6, fpn_channels=128, head_convs=4)
    if quick:
        return SpeedScale(64, 128, 8, 3, 4, student, teacher)
    return SpeedScale(256, 128, 8, 5, 8, student, teacher)


def gpu_scale() -> SpeedScale:
    """COCO-like scale for one large GPU: FCOS R18/FPN-256 student, R50/FPN-256 teacher (torchvision's
    4-conv heads), 800 px canvases, batch 16, AMP as the trainer's default on CUDA. 128 images give 8
    steps per epoch; 3 rounds x 6 steps per mode keep the whole bench near a minute per method."""
    student = DetectorSpec(family="fcos", backbone="resnet18", num_classes=6, fpn_channels=256, head_convs=4)
    teacher = DetectorSpec(family="fcos", backbone="resnet50", num_classes=6, fpn_channels=256, head_convs=4)
    return SpeedScale(128, 800, 16, 3, 6, student, teacher, amp=True)


def store_policy_for(
    method: str,
    *,
    rank: int | None = None,
    value_dtype: str | None = None,
    budget_kb: float | None = None,
    levels: list[str] | None = None,
) -> SelectionPolicy:
    """The compact store a method trains from: nms-ksd cells (int4) for position-wise methods, lowrank
    whole maps (rank 16, int4, or ``rank`` / ``value_dtype``, or the layout a ``budget_kb`` chooses) for
    methods that need whole maps (cwd, defeat, ...); ``levels``: store (and distill) only these."""
    if METHODS.get(method).sparse_ok:
        if rank is not None or budget_kb is not None:
            raise ConfigError(
                f"bench speed: {method} trains from an nms-ksd store; a rank or budget applies to lowrank stores"
            )
        return SelectionPolicy(name="nms-ksd", value_dtype=value_dtype, levels=levels)
    if budget_kb is not None:
        if rank is not None:
            raise ConfigError("bench speed: --budget-kb chooses the ranks itself; drop --rank")
        return SelectionPolicy(name="lowrank", budget_kb=budget_kb, value_dtype=value_dtype, levels=levels)
    return SelectionPolicy(name="lowrank", rank=16 if rank is None else rank, value_dtype=value_dtype, levels=levels)


def run_speed(
    *,
    out_dir: str | Path,
    quick: bool = False,
    method: str = "fitnet",
    workers: int = 2,
    scale: SpeedScale | None = None,
    device: str | torch.device = "cpu",
    data_dir: str | Path | None = None,
    progress: bool = True,
    store_policy: SelectionPolicy | None = None,
) -> dict:
    """Measure everything side by side in one process; ``scale`` overrides the CPU scale (``gpu_scale()``,
    tests). ``data_dir`` shares one synthetic data set between runs (default ``out_dir/data``).
    ``store_policy`` defaults to ``store_policy_for(method)``; online and stored runs distill its levels.

    Logs a line as each of its four phases starts; ``progress`` adds a bar over each phase's rounds.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scale = scale or cpu_scale(quick)
    device = torch.device(device)
    store_policy = store_policy or store_policy_for(method)
    data_dir = Path(data_dir) if data_dir is not None else out / "data"
    log.info("bench speed [1/4]: %d synthetic images in %s, a random-weight teacher", scale.images, data_dir)
    if not (data_dir / "annotations" / "train.json").is_file():
        generate_synthetic(data_dir, num_train=scale.images, num_val=8, image_size=scale.size, seed=0)
    source = open_source(data_dir, format="coco", split="train")
    policy = ViewPolicy(sizes=(scale.size,), flip_prob=0.5)
    torch.manual_seed(0)
    teacher = build_detector(scale.teacher)
    ckpt = out / "teacher.pt"
    save_checkpoint(ckpt, teacher, class_names=source.class_names)
    results: dict = {
        "scale": {
            "images": scale.images,
            "size": scale.size,
            "batch_size": scale.batch_size,
            "student": scale.student.to_dict(),
            "teacher": scale.teacher.to_dict(),
            "method": method,
            "store_policy": store_policy.to_dict(),
            "amp": scale.amp,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "workers": workers,
        }
    }
    teacher.to(device)

    # Teacher inference throughput (features only, as a store build needs) vs store build throughput,
    # in interleaved rounds (inference, compute-only inference, a fresh build) whose medians are reported:
    # single passes drifted by up to 20 % between neighbouring runs on the shared 2-core machine.
    # Inference reads the data through the same loader as the build; the compute-only figure
    # (tensors decoded beforehand) is the stricter bound, reported beside it.
    store_dir = out / "store"
    rounds: dict[str, list[float]] = {"inference": [], "compute": [], "build": [], "build_call": []}
    log.info(
        "bench speed [2/4]: teacher inference vs store build over %d images, %d interleaved rounds",
        scale.images,
        scale.rounds,
    )
    for _ in tqdm(range(scale.rounds), desc="inference / build rounds", disable=not progress, dynamic_ncols=True):
        rounds["inference"].append(_teacher_inference_ips(teacher, source, policy, scale, workers, device))
        rounds["compute"].append(_teacher_inference_ips(teacher, source, policy, scale, workers, device, preload=True))
        if store_dir.exists():
            shutil.rmtree(store_dir)
        t0 = time.perf_counter()
        manifest = build_store(
            teacher_checkpoint=ckpt,
            source=source,
            policy=store_policy,
            views=policy.all_views(),
            canvas=policy.canvas,
            out_dir=store_dir,
            batch_size=scale.batch_size,
            workers=workers,
            progress=False,
            device=device,
            with_importance="importance" in METHODS.get(method).needs,
        )
        # The build loop (data, teacher, select, write), and the whole call (+ checkpoint load, hashing, setup).
        rounds["build"].append(manifest.extra["last_run"]["image_views_per_second"])
        rounds["build_call"].append(manifest.counts["records"] / (time.perf_counter() - t0))
    ratio = {
        name: statistics.median(b / i for b, i in zip(rounds[num], rounds[den], strict=True))
        for name, num, den in (
            ("build", "build", "inference"),
            ("call", "build_call", "inference"),
            ("compute", "build", "compute"),
        )
    }
    results["throughput_rounds_image_views_per_s"] = rounds
    results["teacher_inference_image_views_per_s"] = statistics.median(rounds["inference"])
    results["teacher_compute_image_views_per_s"] = statistics.median(rounds["compute"])
    results["store_build_image_views_per_s"] = statistics.median(rounds["build"])
    results["store_build_call_image_views_per_s"] = statistics.median(rounds["build_call"])
    results["build_over_teacher_inference_throughput_ratio"] = ratio["build"]  # median of per-round ratios
    results["build_call_over_teacher_inference_throughput_ratio"] = ratio["call"]
    results["build_over_teacher_compute_throughput_ratio"] = ratio["compute"]
    info = store_info(store_dir)
    results["scale"]["store_policy"] = info["policy"]  # as built: the ranks and dtype a budget chose
    results["store_bytes_per_image_view"] = info["bytes_per_image_view"]
    results["dense_fp16_bytes_per_image_view"] = info["dense_fp16_bytes_per_view"]
    results["store_over_dense_size_ratio"] = info["ratio_to_dense"]
    results["projected_coco"] = info["projected_coco"]

    # Training step times, interleaved.
    log.info(
        "bench speed [3/4]: training steps of student, online and stored distillation, %d rounds of %d steps",
        scale.rounds,
        scale.steps_per_round,
    )
    times = step_times(
        scale, source, policy, teacher, store_dir, method=method, workers=workers, device=device, progress=progress
    )
    # The same steps on batches held in memory, the stored one's knowledge collated beforehand: what the
    # method's own work costs, apart from reading, decoding and collating the store.
    compute = compute_step_times(scale, source, policy, teacher, store_dir, method=method, device=device)
    cmed = {k: statistics.median(v) for k, v in compute.items()}
    results["compute_step_seconds_median"] = cmed
    results["compute_step_seconds_all"] = compute
    results["method_over_student_compute_ratio"] = cmed["stored"] / cmed["student"]
    # Peak device memory of each mode trained alone (None off CUDA): the stored run holds no teacher.
    results["peak_memory_bytes"] = peak_memory(scale, source, policy, teacher, store_dir, method, workers, device)
    med = {k: statistics.median(v) for k, v in times.items()}
    results["step_seconds_median"] = med
    results["step_seconds_all"] = times
    results["online_over_student_step_ratio"] = med["online"] / med["student"]
    results["stored_over_student_step_ratio"] = med["stored"] / med["student"]
    results["stored_over_online_step_ratio"] = med["stored"] / med["online"]

    # Reader throughput vs what a stored-distillation step consumes.
    log.info("bench speed [4/4]: store reader throughput")
    reader_rps = _reader_throughput(store_dir)
    consumed = scale.batch_size / med["stored"]
    results["reader_records_per_s"] = reader_rps
    results["training_records_consumed_per_s"] = consumed
    results["reader_over_training_consumption_ratio"] = reader_rps / consumed
    return results


def _teacher_inference_ips(teacher, source, policy, scale, workers: int, device, *, preload: bool = False) -> float:
    """Image views per second of the teacher's feature forward over the data, loading included
    (the loader as a store build uses it), or over batches decoded beforehand (``preload``)."""
    cuda = device.type == "cuda"
    loader = build_loader(
        ViewedDataset(source, policy, train=False),
        batch_size=scale.batch_size,
        shuffle=False,
        workers=workers,
        pin_memory=cuda,
    )
    teacher.eval()
    with torch.no_grad():
        first = next(iter(loader)).to(device)
        teacher.features(first.images, first.image_sizes)  # warm-up
        batches = [b.to(device) for b in loader] if preload else loader
        sync(device)
        t0 = time.perf_counter()
        n = 0
        for b in batches:
            b = b.to(device, non_blocking=cuda)
            teacher.features(b.images, b.image_sizes)
            n += len(b)
        sync(device)
    return n / (time.perf_counter() - t0)


def _reader_throughput(store_dir: Path) -> float:
    reader = StoreReader(store_dir)
    keys = [parse_key(key) for key in reader.keys()]
    t0 = time.perf_counter()
    for key in keys:
        reader.read(*key)  # checksum, decode and the codec's int4 -> float16: what a loader worker does
    return len(keys) / (time.perf_counter() - t0)


def write_results(results: dict, path: str | Path) -> None:
    """Strict JSON (null, never NaN) with the run's provenance (command, commit, date, machine) first."""
    write_json(path, {**provenance(), **results})


def format_results(r: dict) -> str:
    med = r["step_seconds_median"]
    lines = [
        f"scale: {r['scale']['images']} synthetic images, {r['scale']['size']} px, batch {r['scale']['batch_size']}, "
        f"student FCOS {r['scale']['student']['backbone']}/FPN-{r['scale']['student']['fpn_channels']}, "
        f"teacher FCOS {r['scale']['teacher']['backbone']}/FPN-{r['scale']['teacher']['fpn_channels']}, "
        f"method {r['scale']['method']}",
        f"step time (median s): student {med['student']:.4f}  online {med['online']:.4f}  stored {med['stored']:.4f}",
        f"  stored / student   {r['stored_over_student_step_ratio']:.3f}   (goal <= 1.05)",
        f"  online / student   {r['online_over_student_step_ratio']:.3f}",
        f"  stored / online    {r['stored_over_online_step_ratio']:.3f}",
        f"  the method's own work: stored / student on batches in memory, knowledge collated beforehand "
        f"{r['method_over_student_compute_ratio']:.3f}",
        f"store size: {r['store_bytes_per_image_view']:.0f} B per image-view vs dense fp16 "
        f"{r['dense_fp16_bytes_per_image_view']:.0f} B: ratio {r['store_over_dense_size_ratio']:.4f} (goal <= 0.05; "
        f"policy {policy_words(r['scale']['store_policy'])})",
        f"  projected at COCO scale ({r['projected_coco']['image_hw'][1]}x{r['projected_coco']['image_hw'][0]}): "
        f"{r['projected_coco']['bytes_per_view'] / 1024:.1f} KB per image-view (goal <= 32 KB)",
        f"build throughput (medians of {len(r['throughput_rounds_image_views_per_s']['build'])} interleaved rounds) "
        f"{r['store_build_image_views_per_s']:.1f} image-views/s vs teacher inference "
        f"{r['teacher_inference_image_views_per_s']:.1f} (same loader): "
        f"ratio {r['build_over_teacher_inference_throughput_ratio']:.3f} (goal >= 0.9)",
        f"  whole build call (checkpoint load, hashing, setup) {r['store_build_call_image_views_per_s']:.1f}/s: "
        f"ratio {r['build_call_over_teacher_inference_throughput_ratio']:.3f}",
        f"  vs teacher compute alone (images decoded beforehand) {r['teacher_compute_image_views_per_s']:.1f}/s: "
        f"ratio {r['build_over_teacher_compute_throughput_ratio']:.3f}",
        f"reader {r['reader_records_per_s']:.0f} records/s vs training consumption "
        f"{r['training_records_consumed_per_s']:.1f}/s: ratio {r['reader_over_training_consumption_ratio']:.1f} "
        "(goal >= 20)",
    ]
    return "\n".join(lines)
