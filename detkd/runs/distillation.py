"""``detkd distill``: a student trained with a teacher's knowledge, live or from a store."""

from __future__ import annotations

import logging
from pathlib import Path

from detkd.config import Recipe
from detkd.data.loader import ViewedDataset
from detkd.distill.capabilities import check_servable
from detkd.distill.inherit import inherit_neck_and_heads
from detkd.distill.task import DistillationTask, build_method, common_levels
from detkd.engine.teacher_ap import measure_teacher_ap, warn_if_weak_teacher
from detkd.errors import ConfigError
from detkd.knowledge.online import OnlineTeacher
from detkd.models.checkpoint import check_classes, file_sha256, load_detector
from detkd.runs.setup import fit_task, setup_run

log = logging.getLogger(__name__)


def is_store(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def distill(recipe: Recipe, *, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
    cfg = recipe.distill
    if not cfg.teacher:
        raise ConfigError("distill.teacher is not set: give a teacher checkpoint or a store directory (teacher=PATH)")
    if not cfg.methods:
        raise ConfigError("no distillation method given: method=NAME (see `detkd distill --help`)")
    from detkd.distill.base import METHODS

    for m in cfg.methods:  # fail on a typo before any data or model is loaded
        if m.name not in METHODS:
            raise ConfigError(f"unknown distillation method {m.name!r}; available: {', '.join(METHODS.names())}")
    if not Path(cfg.teacher).exists():
        raise ConfigError(f"{cfg.teacher}: teacher checkpoint or store not found")
    if Path(cfg.teacher).is_dir() and not is_store(cfg.teacher):
        from detkd.store.manifest import not_a_store

        raise ConfigError(f"distill.teacher={not_a_store(cfg.teacher)}")
    if cfg.online_selection and is_store(cfg.teacher):
        raise ConfigError("distill.online_selection selects from a live teacher; a store has already selected")
    setup = setup_run(recipe)
    bundle, student, device, rank = setup.bundle, setup.student, setup.device, setup.rank
    run_info: dict = {"kind": "distill", "teacher": str(cfg.teacher), "methods": [m.model_dump() for m in cfg.methods]}

    train_dataset = None
    if is_store(cfg.teacher):
        from detkd.store.reader import StoreReader
        from detkd.store.replay import check_store_for_run, providers, without_unstored
        from detkd.store.teacher import StoredTeacher

        reader = StoreReader(cfg.teacher)
        check_store_for_run(
            reader, source=bundle.train_source, policy=bundle.policy, student=student, levels=cfg.levels
        )
        teacher = StoredTeacher(reader)
        view_provider, knowledge_provider = providers(reader, bundle.train_source, bundle.policy)
        train_source, left_out = without_unstored(reader, bundle.train_source, bundle.policy)
        train_dataset = ViewedDataset(
            train_source,
            bundle.policy,
            train=True,
            seed=recipe.train.seed,
            view_provider=view_provider,
            knowledge_provider=knowledge_provider,
        )
        if cfg.inherit:
            raise ConfigError("distill.inherit needs the teacher's weights; it cannot be used with a store")
        run_info.update(
            stored=True,
            teacher_hash=reader.manifest.teacher_hash,
            inherit=False,
            teacher_ap=reader.extra.get("teacher_ap"),
            left_out_unstored=left_out,
        )
        if run_info["teacher_ap"] is not None:
            log.info("stored teacher's AP (x100, measured at build time): %.1f", 100 * run_info["teacher_ap"])
        if cfg.check_teacher and rank == 0:
            if run_info["teacher_ap"] is None:
                log.warning("%s records no teacher AP: the weak-teacher check was skipped", cfg.teacher)
            warn_if_weak_teacher(
                run_info["teacher_ap"],
                where="recorded in the store",
                expected_student_ap=cfg.expected_student_ap,
                min_gain=cfg.min_teacher_gain,
            )
    else:
        teacher_det, payload = load_detector(cfg.teacher, spec=cfg.teacher_model)
        check_classes(payload, bundle.train_source.class_names, path=cfg.teacher, role="teacher")
        selection = None
        if cfg.online_selection:
            from detkd.store.select import SelectionPolicy
            from detkd.store.teacher import SelectingTeacher

            selection = SelectionPolicy.from_dict(dict(cfg.online_selection))
            teacher = SelectingTeacher(teacher_det, selection).to(device)
        else:
            teacher = OnlineTeacher(teacher_det).to(device)
        run_info.update(
            stored=False,
            teacher_hash=file_sha256(cfg.teacher),
            inherit=cfg.inherit,
            online_selection=selection.to_dict() if selection else None,
        )
        if cfg.inherit:
            run_info["inherit_counts"] = inherit_neck_and_heads(student, teacher_det)
        if cfg.check_teacher and rank == 0:
            run_info["teacher_ap"] = check_teacher(teacher_det, bundle, recipe, device)

    levels = common_levels(student, teacher, cfg.levels)
    methods, weights = {}, {}
    for m in cfg.methods:
        if m.name in methods:
            raise ConfigError(f"method {m.name!r} is listed twice")
        methods[m.name] = build_method(m.name, levels=levels, args=m.args)
        weights[m.name] = m.weight
    check_servable(methods, teacher.offer())
    task = DistillationTask(
        student,
        methods=methods,
        weights=weights,
        teacher=teacher,
        levels=list(levels),
        auto_ratio=cfg.auto_ratio,
        auto_measure=cfg.auto_measure,
        calibration_steps=cfg.calibration_steps,
    )
    run_info["levels"] = list(levels)
    metrics = fit_task(
        setup,
        task,
        run_info=run_info,
        resume=resume,
        progress=progress,
        stop_after=stop_after,
        train_dataset=train_dataset,
    )
    if metrics:  # rank 0 only
        metrics["inherit"] = run_info.get("inherit")
        metrics["stored"] = run_info.get("stored")
    return metrics


def check_teacher(teacher, bundle, recipe: Recipe, device) -> float:
    """Evaluate the teacher on the validation split and warn loudly when it is weak."""
    cfg = recipe.distill
    ap, ap50 = measure_teacher_ap(
        teacher,
        bundle.val_source,
        bundle.policy,
        batch_size=recipe.data.batch_size,
        workers=recipe.data.workers,
        device=device,
    )
    log.info("teacher on %s: AP (x100) %.1f, AP50 (x100) %.1f", recipe.data.val_split, 100 * ap, 100 * ap50)
    warn_if_weak_teacher(
        ap, where=str(cfg.teacher), expected_student_ap=cfg.expected_student_ap, min_gain=cfg.min_teacher_gain
    )
    return ap
