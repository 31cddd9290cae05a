"""The study graph, built from the config (the seed's flow):

  preprocess ─┬─► eval-base
              ├─► [ptq-R ─► eval-ptq-R ─►] train-R ─► export-R ─► eval-R ─┐
              └─► ... one chain per run R ...                              ┴─► report

A run may start from another run's trained model (`init_from`) or distil from one
(`teacher`); those become edges too, so the graph orders them. Each stage's params are built
here once, typed (contract.params), with the run's recipe by value.
"""

from __future__ import annotations

from contract.params import (
    EvalStageParams,
    PtqStageParams,
    ReportInput,
    ReportStageParams,
    StageParams,
)
from contract.recipe import Recipe, load_recipe
from pipeline.config import BASE_MODEL, StudyConfig
from pipeline.graph import Graph, Stage

PREPROCESS = "preprocess"
EVAL_BASE = "eval-base"
REPORT = "report"


def train_stage(run: str) -> str:
    return f"train-{run}"


def build_study_graph(config: StudyConfig) -> Graph:
    images = config.images.stages
    resources = config.resources
    stages: list[Stage] = [
        Stage(PREPROCESS, "preprocess", config.data, {}, resources["preprocess"], images["preprocess"])
    ]
    report_inputs: dict[str, ReportInput] = {}

    def eval_params(recipe: Recipe, model: str | None = None, revision: str | None = None) -> StageParams:
        return EvalStageParams.model_validate({**config.eval.model_dump(), "recipe": recipe, "model": model,
                                               "model_revision": revision})

    if config.eval_base:
        base = load_recipe("bf16")  # the value a run naming bf16 holds too: a built-in is read once
        stages.append(Stage(EVAL_BASE, "eval", eval_params(base, config.model, config.model_revision),
                            {"data": PREPROCESS},
                            resources["eval"], images["eval"], tags={"run": BASE_MODEL, "recipe": base.name}))
        report_inputs[EVAL_BASE] = ReportInput(run=BASE_MODEL, phase="base", recipe=base.name,
                                               inference_format=base.inference_format)

    for name, run in config.runs.items():
        if not run.enabled:
            continue
        recipe = run.recipe
        tags = {"run": name, "recipe": recipe.name, "backend": run.backend, "method": run.method}

        def row(phase: str) -> ReportInput:
            return ReportInput(run=name, phase=phase, recipe=recipe.name,  # noqa: B023 (used at once)
                               inference_format=recipe.inference_format, backend=run.backend, method=run.method)

        train = config.train_params(name)
        train_inputs = {"data": PREPROCESS}
        updates: dict[str, object] = {}
        if run.init_from == BASE_MODEL:
            updates["model"] = train.model or config.model
            updates["model_revision"] = train.model_revision if train.model else config.model_revision
        else:
            train_inputs["model"] = train_stage(run.init_from)
        if run.method == "qad":
            if run.teacher == BASE_MODEL:
                teacher = ({} if train.qad.teacher_model else
                           {"teacher_model": config.model, "teacher_revision": config.model_revision})
                updates["qad"] = train.qad.model_copy(update=teacher)
            else:
                train_inputs["teacher"] = train_stage(run.teacher)
        train = train.model_copy(update=updates)
        if run.ptq:
            ptq = PtqStageParams.model_validate({**config.ptq.model_dump(), "recipe": recipe,
                                                 "backend": run.backend, "model": train.model,
                                                 "model_revision": train.model_revision})
            ptq_inputs = {"data": PREPROCESS}
            if "model" in train_inputs:
                ptq_inputs["model"] = train_inputs["model"]
            stages.append(Stage(f"ptq-{name}", "ptq", ptq, ptq_inputs, resources["ptq"], images["ptq"], tags))
            stages.append(Stage(f"eval-ptq-{name}", "eval", eval_params(recipe),
                                {"data": PREPROCESS, "model": f"ptq-{name}"},
                                resources["eval"], images["eval"], {**tags, "phase": "ptq"}))
            report_inputs[f"eval-ptq-{name}"] = row("ptq")
            train_inputs["model"] = f"ptq-{name}"
            train = train.model_copy(update={"model": None, "model_revision": None})  # starts from the PTQ stage's model
        stages.append(Stage(train_stage(name), "train", train, train_inputs,
                            config.run_resources(name), images["train"], tags))
        report_inputs[train_stage(name)] = row("trained")
        if run.export:
            stages.append(Stage(f"export-{name}", "export", config.export_params(name),
                                {"model": train_stage(name), "data": PREPROCESS}, resources["export"],
                                images["export"], tags))
        if run.export and run.evaluate:
            stages.append(Stage(f"eval-{name}", "eval", eval_params(recipe),
                                {"data": PREPROCESS, "model": f"export-{name}"},
                                resources["eval"], images["eval"], tags))
            report_inputs[f"eval-{name}"] = row("trained")

    report = ReportStageParams.model_validate({**config.report.model_dump(), "study": config.study,
                                               "description": config.description, "inputs": report_inputs})
    stages.append(Stage(REPORT, "report", report, {role: role for role in report_inputs},
                        resources["report"], images["report"]))
    return Graph(stages)


def image_refs(config: StudyConfig) -> dict[str, str]:
    return dict(config.images.refs)
