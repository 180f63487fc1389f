"""Progressive distillation of a latent diffusion model: rounds that halve the DDIM steps, each a trainer run.

``distil_latent_diffusion(codec, teacher, datalist, run_dir, out=..., start_steps=64, final_steps=4,
iterations_per_round=500)`` trains students of 32, 16, 8 and 4 steps in turn: round ``N`` trains a copy of the
previous model (the teacher file for the first round, then the previous round's EMA export) with
:class:`~meddiff3d.diffusion.DistillationObjective` (one student DDIM step = two teacher steps), on the datalist's
latents encoded once by the cached encoder (:func:`~meddiff3d.pipelines.latents.encode_latents`, as
:func:`~meddiff3d.pipelines.training.train_latent_diffusion` does). ``out`` is the last round's export: the teacher's
meta plus ``meta["sampling"] = {"sampler": "ddim", "steps": final_steps, "spacing": "trailing"}`` (the grid the
student was trained on and must be sampled on) and ``meta["distillation"]`` (teacher file and SHA-256, steps,
iterations per round, guidance scale, the distillation's data and settings).

``RUN_DIR`` layout (re-running the same call resumes; other settings in the same ``RUN_DIR`` are refused)::

    distillation.json     the run's settings and teacher fingerprint
    latents/latents.pt    the encoded datalist, shared by every round
    round_32/ ...         one trainer run per round (checkpoints/, inference.pt = that round's student)

A finished round (its ``inference.pt`` at ``iterations_per_round``) is skipped; the round a kill interrupted resumes
from its last checkpoint (the engine's exact resume). The learning rate decays linearly to 0 within each round
(``lr_anneal``), so every round ends on settled weights whatever its length.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

from meddiff3d.checks import check_int, check_number, check_output_dir
from meddiff3d.diffusion import (PREDICTION_TYPES, DistillationObjective, distillation_grid, distillation_spacing,
                                 schedule_from_dict)
from meddiff3d.engine import train
from meddiff3d.engine.checkpoint import kind_tag, read_file
from meddiff3d.engine.recipes import publish_inference, trainer_settings, training_summary
from meddiff3d.errors import InputError
from meddiff3d.models.ldm import (check_guidance_support, coordinate_wrapper, covariate_conditioning,
                                  load_latent_diffusion, null_condition)
from meddiff3d.models.loading import LoadedModel, load_model
from meddiff3d.pipelines.latents import encode_latents
from meddiff3d.pipelines.preflight import output_file
from meddiff3d.utils.io import save_json

logger = logging.getLogger("meddiff3d.pipelines")

__all__ = ["TRAINER_DEFAULTS", "distillation_rounds", "round_objective", "teacher_objective", "distil_latent_diffusion"]

#: trainer settings of this recipe unless given (``max_iterations`` is ``iterations_per_round``)
TRAINER_DEFAULTS = {"batch_size": 4, "lr": 1e-4, "ema_decay": 0.999, "amp": "auto", "grad_clip": 1.0,
                    "device": "auto", "seed": 0, "checkpoint_every": 100, "log_every": 10, "progress": True}
PLAN_FILE = "distillation.json"


def distillation_rounds(start_steps: int, final_steps: int) -> list[int]:
    """The student step counts ``[start/2, start/4, ..., final]``; an :class:`InputError` unless
    ``start_steps / final_steps`` is a power of 2 greater than 1."""
    start, final = check_int("start_steps", start_steps, 2), check_int("final_steps", final_steps, 1)
    if final >= start:
        raise InputError(f"final_steps ({final}) must be smaller than start_steps ({start}): each round halves the "
                         "steps")
    ratio = start // final
    if start % final or ratio & (ratio - 1):
        raise InputError(f"start_steps / final_steps must be a power of 2 (each round halves the steps), got "
                         f"{start} / {final}")
    rounds, steps = [], start
    while steps > final:
        steps //= 2
        rounds.append(steps)
    return rounds


def _dropout(meta: Mapping[str, Any], cond_dropout: float | None, source: Any) -> float:
    """The distillation's conditioning dropout: the teacher's unless given (0 when its meta does not record it);
    refused where the teacher knows no null condition (unconditional, or trained without dropout)."""
    mode = meta["conditioning"]["mode"]
    taught = (meta.get("training") or {}).get("cond_dropout") if mode != "none" else 0.0  # None: not recorded
    if cond_dropout is None:
        return float(taught or 0.0)
    value = check_number("cond_dropout", cond_dropout, 0.0, 1.0)
    if value > 0 and (mode == "none" or taught == 0):
        why = "is unconditional" if mode == "none" else "was trained without conditioning dropout (no null condition)"
        raise InputError(f"cond_dropout={value:g}: the teacher {source} {why}; leave cond_dropout at null")
    return value


def round_objective(teacher: torch.nn.Module, meta: Mapping[str, Any], steps: int, *, guidance_scale: float = 1.0,
                    cond_dropout: float = 0.0, prediction: str | None = None) -> DistillationObjective:
    """The objective of one round: a student of ``steps`` DDIM steps distilled from ``teacher`` (the network of a
    latent diffusion file whose ``meta`` gives the schedule, prediction, conditioning and coordinate channels)."""
    cond = meta["conditioning"]
    null = null_condition(len(cond["covariates"]), cond["mode"], cond["null_value"])
    return DistillationObjective(teacher, schedule_from_dict(meta["schedule"]), steps,
                                 teacher_prediction=meta["prediction"], prediction=prediction,
                                 guidance_scale=guidance_scale, cond_dropout=cond_dropout if cond["mode"] != "none"
                                 else 0.0, null_cond=null, network_wrapper=coordinate_wrapper(meta))


def _check_teacher(teacher: LoadedModel, start_steps: int, rounds: list[int], guidance_scale: float,
                   cond_dropout: float | None) -> float:
    """Refuse a teacher the rounds cannot distil (guidance it cannot give, a grid its schedule lacks, a distilled
    teacher of other steps); returns the distillation's conditioning dropout."""
    meta, source = teacher.meta, teacher.path
    folded = (meta.get("distillation") or {}).get("guidance_scale", 1.0)
    if folded != 1.0 and guidance_scale != 1.0:
        raise InputError(f"teacher {source} was distilled with guidance {folded:g} folded in: distil it further with "
                         f"guidance_scale 1 (got {guidance_scale:g})")
    check_guidance_support(meta, source, conditional=True, guidance_scale=guidance_scale)
    schedule = schedule_from_dict(meta["schedule"])
    sampling = meta.get("sampling") or {}
    if "distillation" in meta and (sampling.get("steps") != start_steps
                                   or sampling.get("spacing") != distillation_spacing(schedule)):
        raise InputError(f"teacher {source} is a distilled {sampling.get('steps')}-step model: start_steps must be "
                         f"its steps ({sampling.get('steps')}), got {start_steps}")
    for steps in rounds:
        try:
            distillation_grid(schedule, steps)
        except InputError as err:
            raise InputError(f"teacher {source}: {err}") from None
    return _dropout(meta, cond_dropout, source)


def teacher_objective(teacher: str | os.PathLike, start_steps: int, *, guidance_scale: float = 1.0,
                      cond_dropout: float | None = None, prediction: str | None = None) -> DistillationObjective:
    """The first round's objective for the ``teacher`` file (a ``start_steps / 2``-step student), checked as
    :func:`distil_latent_diffusion` checks it: the bundle's ``train#inferer``."""
    start_steps = check_int("start_steps", start_steps, 2)
    if start_steps % 2:
        raise InputError(f"start_steps must be even (a round halves the steps), got {start_steps}")
    loaded = load_model(teacher, "latent_diffusion")
    dropout = _check_teacher(loaded, start_steps, [start_steps // 2], check_number("guidance_scale", guidance_scale, 0),
                             cond_dropout)
    return round_objective(loaded.network, loaded.meta, start_steps // 2, guidance_scale=guidance_scale,
                           cond_dropout=dropout, prediction=prediction)


def _plan(run_dir: Path, plan: dict[str, Any]) -> None:
    """Record the run's settings in ``RUN_DIR/distillation.json``, or refuse a run_dir made with other ones."""
    path = run_dir / PLAN_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = {k: (saved.get(k), v) for k, v in plan.items() if saved.get(k) != v}
        if changed:
            raise InputError(f"run_dir {run_dir} holds a distillation with other settings (saved, now: {changed}); "
                             "use a new run_dir or the same settings")
    elif int(os.environ.get("RANK", "0")) == 0:
        save_json(plan, path)


def _finished(round_dir: Path, iterations: int) -> bool:
    """Whether a round's export holds its last iteration (a kill between the two final writes: not finished)."""
    export = round_dir / "inference.pt"
    if not export.is_file():
        return False
    try:
        return int(read_file(export, what="round export").get("iteration", -1)) >= iterations
    except InputError:
        return False


def distil_latent_diffusion(
    codec: str | os.PathLike,
    teacher: str | os.PathLike,
    datalist: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    out: str | os.PathLike,
    start_steps: int = 64,
    final_steps: int = 4,
    iterations_per_round: int = 500,
    guidance_scale: float = 1.0,
    cond_dropout: float | None = None,
    prediction: str | None = None,
    lr_anneal: bool = True,
    section: str = "training",
    **trainer: Any,
) -> dict[str, Any]:
    """Distil ``teacher`` (a latent diffusion file trained on ``codec`` 's latents) from ``start_steps`` to
    ``final_steps`` DDIM steps; returns a summary dict (see the module docstring).

    Args:
        codec: the teacher's codec file (checked against the teacher's fingerprint); encodes the datalist.
        teacher: the latent diffusion model file to distil (a distilled file too, with ``start_steps`` its steps).
        datalist: datalist JSON; ``section`` items are encoded (each with every covariate the teacher knows).
        run_dir: latents, one folder per round, the settings file; re-running resumes.
        out: the final student (EMA weights + meta), e.g. ``models/model_distilled.pt``.
        start_steps, final_steps: the teacher's DDIM steps and the final student's; their ratio a power of 2.
        iterations_per_round: optimiser steps of each round.
        guidance_scale: classifier-free guidance of the teacher folded into the students (sample them with 1).
        cond_dropout: share of samples distilled with the null condition (unguided unconditional teacher);
            ``None``: the teacher's training value.
        prediction: the students' parameterisation; ``None``: the teacher's.
        lr_anneal: decay the learning rate linearly to 0 within each round (unless ``lr_schedule`` is given).
        trainer: settings of :class:`~meddiff3d.engine.DiffusionTrainer` over :data:`TRAINER_DEFAULTS` (not
            ``max_iterations``: that is ``iterations_per_round``).
    """
    start = time.perf_counter()
    if "max_iterations" in trainer:
        raise InputError("distillation: give iterations_per_round (optimiser steps of each round), not max_iterations")
    settings = trainer_settings(TRAINER_DEFAULTS, trainer, "distillation")
    rounds = distillation_rounds(start_steps, final_steps)
    iterations = check_int("iterations_per_round", iterations_per_round, 1)
    guidance_scale = check_number("guidance_scale", guidance_scale, 0.0)
    if prediction is not None and prediction not in PREDICTION_TYPES:
        raise InputError(f"unknown prediction type {prediction!r}; valid: {list(PREDICTION_TYPES)}")
    run_dir, out = check_output_dir(run_dir, "run_dir"), output_file(out, "out")
    codec_file, teacher_file = load_latent_diffusion(codec, teacher)
    dropout = _check_teacher(teacher_file, start_steps, rounds, guidance_scale, cond_dropout)
    plan = {"teacher_sha256": teacher_file.sha256, "start_steps": start_steps, "final_steps": final_steps,
            "iterations_per_round": iterations, "guidance_scale": guidance_scale, "cond_dropout": dropout,
            "prediction": prediction or teacher_file.meta["prediction"], "section": section}
    _plan(run_dir, plan)

    meta0 = teacher_file.meta
    names = list(meta0["conditioning"]["covariates"])
    latent_set = encode_latents(codec_file, datalist, run_dir / "latents", covariates=names, section=section,
                                device="cpu", progress=settings["progress"])
    items = latent_set.items(partial(covariate_conditioning, mode=meta0["conditioning"]["mode"]))
    if lr_anneal and "lr_schedule" not in settings:
        settings["lr_schedule"] = partial(_linear_decay, iterations=iterations)
    distillation = {"teacher": {"file": Path(teacher_file.path).name, "sha256": teacher_file.sha256},
                    **{k: v for k, v in plan.items() if k != "teacher_sha256"}, "rounds": rounds,
                    "datalist": str(datalist), "num_volumes": len(latent_set.ids),
                    "batch_size": settings["batch_size"], "lr": settings["lr"], "seed": settings["seed"],
                    "lr_anneal": bool(lr_anneal), "previous": meta0.get("distillation")}
    base_meta = {k: v for k, v in meta0.items() if k not in ("sampling", "distillation")}
    base_meta["kind"] = kind_tag("latent_diffusion")
    base_meta["prediction"] = plan["prediction"]
    base_meta["training"] = {**dict(meta0.get("training") or {}), "cond_dropout": dropout}

    source, report, result = teacher_file, [], None
    for k, steps in enumerate(rounds):
        round_dir = run_dir / f"round_{steps}"
        if k < len(rounds) - 1 and _finished(round_dir, iterations):
            logger.info("distillation round %d -> %d steps: finished in %s, skipped", 2 * steps, steps, round_dir)
            report.append({"steps": steps, "skipped": True})
            source = round_dir / "inference.pt"
            continue
        loaded = source if isinstance(source, LoadedModel) else load_model(source, "latent_diffusion")
        objective = round_objective(loaded.network, loaded.meta, steps, guidance_scale=guidance_scale,
                                    cond_dropout=dropout, prediction=plan["prediction"])
        student = copy.deepcopy(loaded.network).requires_grad_(True).train()
        del loaded
        meta = {**base_meta, "sampling": objective.sampling, "distillation": {**distillation, "steps": steps}}
        logger.info("distillation round %d -> %d steps (%d iterations) in %s", 2 * steps, steps, iterations, round_dir)
        result = train(student, objective, items, run_dir=round_dir, meta=meta, max_iterations=iterations, **settings)
        report.append({"steps": steps, "skipped": False, "iteration": result.iteration,
                       "resumed_from": result.resumed_from, "last_loss": result.last_loss})
        source = result.inference
    publish_inference(result, out)
    return training_summary("distillation", result, out, start, rounds=report, sampling=meta["sampling"],
                            num_volumes=len(latent_set.ids), latent_cache=str(latent_set.path),
                            latent_cache_reused=latent_set.reused)


def _linear_decay(step: int, iterations: int) -> float:
    """The learning-rate factor at optimiser step ``step`` of a round: ``1 - step / iterations`` (pure, resumable)."""
    return max(0.0, 1.0 - step / iterations)
