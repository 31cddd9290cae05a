"""The train stage: SFT, QAT and QAD of a Hugging Face causal LM, 1 or N processes (FSDP2).

Order of construction (each step's reason in its comment): params -> process group -> model
-> precision recipe -> activation checkpointing / compile -> FSDP2 -> optimizer -> resume.
"""

from __future__ import annotations

import contextlib
import gc
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from contract.device_sharing import record_sharing, steps_window
from contract.params.train import TrainStageParams
from contract.recipe import Recipe
from stages.batches import StepPlan, TokenSplit, TrainOrder
from stages.hf_model import (
    DTYPES,
    MODELOPT_STATE_FILE,
    load_causal_lm,
    load_tokenizer,
    modelopt_state,
    quantizer_state,
    read_precision,
    resolve_model_source,
    source_revision,
)
from stages.precision.modelopt_backend import SavedQuantizers
from stages.runtime import StageContext, StageInputError
from stages.train import checkpoint as ckpt
from stages.train.distributed import (
    World,
    any_rank,
    barrier,
    decoder_layers,
    init_world,
    shard,
)
from stages.train.loop import (
    Session,
    StepResult,
    calibration_loop,
    train_step,
    validate,
)
from stages.train.metrics import (
    MetricsFile,
    Progress,
    mfu,
    peak_flops,
    trainable_flop_params,
)
from stages.train.model_io import save_final
from stages.train.schedule import build_scheduler
from stages.versions import package_versions

# Steps left out of the mean step time: the first ones pay for warm-up (allocator, compile).
WARMUP_STEPS_EXCLUDED = 2


def run(ctx: StageContext) -> dict[str, Any]:
    params = ctx.params_as(TrainStageParams)
    ctx.defer_signals = True  # finish the step, checkpoint, then stop (Slurm preemption)
    world = init_world(params.device, need_group=_compute_dtype(params) is not None)
    try:
        summary = _train(ctx, params, world)
    except BaseException:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # no barrier: other ranks may be gone
        raise
    barrier(world)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return summary


def _compute_dtype(params: TrainStageParams) -> torch.dtype | None:
    """The FSDP2 compute dtype, when it differs from the master weights' dtype."""
    if params.compute_dtype is None or params.compute_dtype == params.dtype:
        return None
    return DTYPES[params.compute_dtype]


@dataclass(frozen=True)
class TrainData:
    """The step plan and the data it reads: the preprocess splits and the seeded row order."""

    plan: StepPlan
    train: TokenSplit
    val: TokenSplit
    order: TrainOrder


@dataclass(frozen=True)
class Training:
    """What build_training made: the session the loop steps, and what the final save records."""

    session: Session
    recipe: Recipe
    start: int  # steps already done (a resumed run)
    describe: dict[str, str]  # the MLflow tags of the precision recipe as it ran


def _train(ctx: StageContext, params: TrainStageParams, world: World) -> dict[str, Any]:
    seed_everything(params.seed, world.device)
    data = load_data(ctx, params, world)
    source = resolve_model_source(ctx.spec.inputs.get("model"), params.model, "params.model")
    revision = source_revision(ctx.spec.inputs.get("model"), params.model_revision)
    tokenizer = load_tokenizer(source, "params.model", revision)
    model = load_causal_lm(source, params.dtype, "params.model", revision=revision).to(world.device)
    training = build_training(ctx, params, world, data, model, source)
    metrics_file = MetricsFile(ctx.output_dir, training.start) if world.is_main else None
    summary = train_loop(ctx, training.session, training.start, metrics_file)
    if metrics_file is not None:
        summary["device_sharing"] = _device_sharing(ctx.spec.stage, metrics_file, world)
        summary["versions"] = package_versions()

    model, prepared, recipe = training.session.model, training.session.prepared, training.recipe
    precision = {
        "recipe": recipe.model_dump(mode="json"),
        "backend": prepared.backend,
        "method": params.method,
        "dtype": params.dtype,
        "describe": training.describe,
    }
    extra = {MODELOPT_STATE_FILE: prepared.modelopt_state()} if prepared.backend == "modelopt" and world.is_main else {}
    save_final(model, tokenizer, ctx.output_dir, world, precision, extra)
    barrier(world)
    return {**summary, "backend": prepared.backend, "recipe": recipe.name, "world_size": world.world_size}


def load_data(ctx: StageContext, params: TrainStageParams, world: World) -> TrainData:
    plan = StepPlan(params.global_batch, params.micro_batch, world.world_size)
    plan.check()
    data_dir = ctx.input_dir("data")
    train_split, val_split = TokenSplit(data_dir, "train"), TokenSplit(data_dir, "val")
    return TrainData(plan, train_split, val_split, TrainOrder(len(train_split), params.seed))


def build_training(
    ctx: StageContext, params: TrainStageParams, world: World, data: TrainData, model: torch.nn.Module, source: str
) -> Training:
    """Everything between the loaded model and the first step: the precision recipe, activation
    checkpointing, compile, FSDP2, AdamW and its schedule, a resume from the newest checkpoint,
    and the run's tags. `source` is where the model came from (a ModelOpt run's quantizers)."""
    from stages.precision import PrecisionUnavailable, prepare_model

    decoder_layers(model)  # fail early on an unsupported architecture
    teacher = _load_teacher(ctx, params, source, world) if params.method == "qad" else None

    recipe = params.recipe
    saved = _saved_modelopt_quantizers(source, recipe) if params.backend == "modelopt" else None
    calibrate = (
        calibration_loop(data.train, data.order, params.micro_batch, params.calib_batches, world.device)
        if params.calib_batches and saved is None
        else None
    )
    try:
        # Before FSDP2: the recipe swaps linears, and fully_shard must see the final modules.
        prepared = prepare_model(
            model, recipe, params.backend, calibrate=calibrate, saved_quantizers=saved, for_compile=params.compile
        )
    except PrecisionUnavailable as error:
        raise StageInputError(f"params.backend: {error}") from None
    if saved is not None:
        ctx.log.info("modelopt: quantizers and their amax restored from %s (no calibration)", source)
    model = prepared.model
    model.train()
    if params.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if params.compile:
        for layer in decoder_layers(model):
            layer.compile()
    shard(model, world, _compute_dtype(params))
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=params.lr,
        betas=params.betas,
        eps=params.eps,
        weight_decay=params.weight_decay,
        # One kernel for the whole update on a GPU (for-each: several passes over the weights, the
        # gradients and both moments, and a copy of the second moment).
        fused=world.device.type == "cuda",
    )
    scheduler = build_scheduler(
        optimizer,
        lr=params.lr,
        min_lr=params.min_lr,
        warmup_steps=params.warmup_steps,
        steps=params.steps,
        schedule=params.schedule,
    )
    session = Session(params, world, model, prepared, optimizer, scheduler, data.train, data.val, data.order,
                      data.plan, teacher)

    start = 0
    resumed = ckpt.resume_newest(ctx.output_dir, model, optimizer, world, ctx.log)
    if resumed is not None:
        scheduler.load_state_dict(resumed.state.scheduler)
        if resumed.quantizer_state is not None:
            prepared.load_state_dict(resumed.quantizer_state)
        start = resumed.state.step
        prepared.on_step(start)  # re-applies step-dependent switches (QAT fake-quant delay)
        ctx.log.info("resumed from %s (step %d)", resumed.path, start)

    describe = {str(k): str(v) for k, v in prepared.describe().items()}
    if prepared.backend == "modelopt":
        describe["modelopt_quantizers"] = f"restored from {source}" if saved is not None else "calibrated"
    ctx.tracker.set_tags(
        {**describe, "recipe": recipe.name, "backend": prepared.backend, "method": params.method,
         "world_size": str(world.world_size), "device": world.device.type,
         "compute_dtype": params.compute_dtype or params.dtype}
    )
    return Training(session, recipe, start, describe)


@contextlib.contextmanager
def collect_garbage_between_steps(every: int) -> Iterator[Callable[[int], None]]:
    """Python's automatic GC off inside; call the yielded function with the steps done after each
    step: it collects every `every` steps (0: leave Python's GC as it is, the function does nothing)."""
    if not every:
        yield lambda done: None
        return
    def collect(done: int) -> None:
        if done % every == 0:
            gc.collect(1)  # the young generations: where a step's garbage is

    gc.collect()
    gc.disable()
    try:
        yield collect
    finally:
        gc.enable()


def train_loop(ctx: StageContext, s: Session, start: int, metrics_file: MetricsFile | None) -> dict[str, Any]:
    with collect_garbage_between_steps(s.params.gc_every) as collect:
        return _steps(ctx, s, start, metrics_file, collect)


def _steps(
    ctx: StageContext, s: Session, start: int, metrics_file: MetricsFile | None, collect: Callable[[int], None]
) -> dict[str, Any]:
    p, world = s.params, s.world
    peak = peak_flops(world.device)
    n_params = trainable_flop_params(s.model) if peak is not None else 0
    progress = Progress(p.steps, start, p.log_every, ctx.log, enabled=world.is_main)
    step_times: list[float] = []
    last: StepResult | None = None
    val_loss: float | None = None
    val_step = -1
    saved_step = start
    for step in range(start, p.steps):
        began = time.perf_counter()
        last = train_step(s, step)
        if world.device.type == "cuda":
            torch.cuda.synchronize(world.device)
        elapsed = time.perf_counter() - began
        ended_at = time.time()  # wall clock: what the device-sharing record is compared with
        step_times.append(elapsed)
        done = step + 1
        collect(done)  # after the step's timing: a collection pauses no GPU work here
        row: dict[str, Any] = {
            "loss": last.loss,
            "lr": last.lr,
            "grad_norm": last.grad_norm,
            "step_time_s": elapsed,
            "tokens_per_s": last.tokens / elapsed,
        }
        if last.kd_loss is not None:
            row.update(ce_loss=last.ce_loss, kd_loss=last.kd_loss)
        utilisation = mfu(n_params, last.tokens, elapsed, peak, world.world_size)
        if utilisation is not None:
            row["mfu"] = utilisation
        if (p.val_every and done % p.val_every == 0) or done == p.steps:
            val_loss, val_step = validate(s), done
            row["val_loss"] = val_loss
            progress.note(f"step {done}: val_loss {val_loss:.4f}")
        ctx.tracker.log_metrics(row, step=done)
        if metrics_file is not None:
            metrics_file.append({"step": done, **row, "ended_at": ended_at})
        progress.update(done, last.loss, row["tokens_per_s"])
        stop = any_rank(ctx.interrupted, world)
        if (p.checkpoint_every and done % p.checkpoint_every == 0) or (stop and done < p.steps):
            _save(ctx, s, done)
            saved_step = done
        if stop:
            ctx.interrupted = True  # every rank stops at the same step
            progress.close()
            ctx.log.warning("interrupted after step %d; checkpoint at step %d", done, saved_step)
            ctx.check_interrupted()
    progress.close()
    if val_step != p.steps:  # resumed at the end: nothing ran, still report the final val loss
        val_loss = validate(s)
    timed = step_times[WARMUP_STEPS_EXCLUDED:] or step_times
    mean_step = sum(timed) / len(timed) if timed else None
    tokens_per_step = p.global_batch * s.train.rows([0]).input_ids.shape[1]
    return {
        "train_loss": last.loss if last else _last_logged_loss(metrics_file),
        "val_loss": val_loss,
        "mean_step_time_s": mean_step,
        "tokens_per_s": tokens_per_step / mean_step if mean_step else None,
        "steps": p.steps,
    }


def _save(ctx: StageContext, s: Session, step: int) -> None:
    checkpointed_quantizers = s.prepared.state_dict() or None
    ckpt.save_checkpoint(
        ctx.output_dir,
        ckpt.TrainState(step=step, scheduler=s.scheduler.state_dict()),
        s.model,
        s.optimizer,
        s.world,
        checkpointed_quantizers,
        s.params.keep_checkpoints,
    )


def _load_teacher(ctx: StageContext, params: TrainStageParams, student_source: str, world: World) -> torch.nn.Module:
    """The full-precision teacher: eval mode, no grad, same dtype as the student was loaded in."""
    source = resolve_model_source(
        ctx.spec.inputs.get("teacher"), params.qad.teacher_model or student_source, "params.qad.teacher_model",
        input_field="inputs.teacher",
    )
    # The default teacher is the student's starting model, at the student's revision.
    revision = (params.qad.teacher_revision if params.qad.teacher_model
                else source_revision(ctx.spec.inputs.get("model"), params.model_revision))
    revision = source_revision(ctx.spec.inputs.get("teacher"), revision)
    teacher = load_causal_lm(source, params.dtype, "params.qad.teacher_model", revision=revision).to(world.device)
    teacher.eval()
    teacher.requires_grad_(False)
    return shard(teacher, world, _compute_dtype(params))


def _saved_modelopt_quantizers(source: str, recipe: Recipe) -> SavedQuantizers | None:
    """A ModelOpt PTQ or QAT run of this very recipe (its model dir): its quantizers, which
    training continues from as ModelOpt's QAT guide does, rather than calibrating anew."""
    model_dir = Path(source)
    precision = read_precision(model_dir) if model_dir.is_dir() else None
    if precision is None or precision.get("recipe") != recipe.model_dump(mode="json"):
        return None
    state = modelopt_state(model_dir)
    return None if state is None else SavedQuantizers(state, quantizer_state(model_dir))


def _device_sharing(stage: str, metrics_file: MetricsFile, world: World) -> dict[str, Any] | None:
    """What else ran on this stage's GPUs or CPU cores while its steps ran (contract/device_sharing.py)."""
    window = steps_window(metrics_file.rows())
    return None if window is None else record_sharing(stage, window, world.device.type == "cuda")


def _last_logged_loss(metrics_file: MetricsFile | None) -> float | None:
    rows = metrics_file.rows() if metrics_file is not None else []
    return rows[-1]["loss"] if rows else None


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":
        # Bit-exact resume and 1-vs-N comparisons on CPU; warn_only keeps ops without a
        # deterministic kernel running (they are listed once in the log).
        torch.use_deterministic_algorithms(True, warn_only=True)
