"""Multiple-choice accuracy through lm-eval-harness, offline, on the deployed model object.

Task YAMLs come from params.lm_eval_task_dir (e.g. fixtures/mmlu_tiny) plus lm-eval's own
(`mmlu` at study scale, whose dataset must already be in the HF datasets cache: the stage
sets HF_DATASETS_OFFLINE/HF_HUB_OFFLINE and never downloads).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from contract.params.eval import EvalStageParams
from stages.runtime import StageInputError


def run_lm_eval(model: nn.Module, tokenizer: Any, params: EvalStageParams, device: torch.device) -> dict[str, dict[str, float]]:
    """{task: {"acc": ..., "acc_stderr": ..., "n": questions scored}} for each of params.lm_eval_tasks."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as error:
        raise StageInputError(f"params.lm_eval_tasks: lm-eval is not installed ({error}); pip install lm-eval or set lm_eval_tasks: []") from None
    manager = task_manager(params)
    unknown = [t for t in params.lm_eval_tasks if t not in manager.all_tasks]
    if unknown:
        raise StageInputError(f"params.lm_eval_tasks: unknown task(s) {unknown}; check lm_eval_task_dir ({params.lm_eval_task_dir})")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=params.micro_batch, device=str(device))
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(params.lm_eval_tasks), task_manager=manager,
                                      limit=params.lm_eval_limit, log_samples=False)
    except (ConnectionError, OSError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise StageInputError(f"params.lm_eval_tasks: a task's data is not available offline ({first})") from None
    results: dict[str, dict[str, float]] = {}
    for task in params.lm_eval_tasks:
        metrics = out["results"][task]
        results[task] = {"acc": float(metrics["acc,none"]), "acc_stderr": float(metrics.get("acc_stderr,none") or 0.0),
                         "n": int(out["n-samples"][task]["effective"])}
    return results


def task_manager(params: EvalStageParams) -> Any:
    """lm-eval's index of the tasks to run. Indexing lm-eval's own tasks reads every one of its
    ~14,000 task YAMLs (6 s on one core, in every eval stage): it is done only when a task
    asked for is not a plain task of `lm_eval_task_dir`. A task found there is the same either
    way (lm-eval lets the include path override its own tasks); a group or tag of the task dir
    may name lm-eval's own tasks, so it takes the whole index."""
    from lm_eval.tasks import TaskManager

    if params.lm_eval_task_dir:
        own = TaskManager(include_path=params.lm_eval_task_dir, include_defaults=False)
        if all(task in own.all_subtasks for task in params.lm_eval_tasks):
            return own
        return TaskManager(include_path=params.lm_eval_task_dir)
    return TaskManager()
