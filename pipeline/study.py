"""The study graph, built from the config (the seed's flow):

  preprocess ─┬─► eval-base
              ├─► [ptq-R ─► eval-ptq-R ─►] train-R ─► export-R ─► eval-R ─┐
              └─► ... one chain per run R ...                              ┴─► report

A run may start from another run's trained model (`init_from`) or distil from one
(`teacher`); those become edges too, so the graph orders them.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import BASE_MODEL, StudyConfig
from pipeline.graph import Graph, Stage
from stages.precision.recipe import load_recipe

PREPROCESS = "preprocess"
EVAL_BASE = "eval-base"
REPORT = "report"


def train_stage(run: str) -> str:
    return f"train-{run}"


def build_study_graph(config: StudyConfig) -> Graph:
    images = config.images.stages
    resources = config.resources
    data_params = config.data.model_dump(mode="json")
    if data_params.get("tokenizer") is None:
        data_params["tokenizer"] = config.model
    stages: list[Stage] = [
        Stage(PREPROCESS, "preprocess", data_params, {}, resources["preprocess"], images["preprocess"])
    ]
    eval_params = config.eval.model_dump(mode="json")
    report_inputs: dict[str, str] = {}
    if config.eval_base:
        stages.append(
            Stage(EVAL_BASE, "eval", {**eval_params, "model": config.model, "recipe": "bf16"},
                  {"data": PREPROCESS}, resources["eval"], images["eval"],
                  tags={"run": BASE_MODEL, "recipe": "bf16"})
        )
        report_inputs[EVAL_BASE] = EVAL_BASE

    for name, run in config.runs.items():
        if not run.enabled:
            continue
        # The tag holds the recipe's name, also for a recipe given as a YAML path.
        tags = {"run": name, "recipe": load_recipe(run.recipe).name, "backend": run.backend,
                "method": run.method}
        train_params: dict[str, Any] = config.train_params(name).model_dump(mode="json")
        train_inputs = {"data": PREPROCESS}
        if run.init_from == BASE_MODEL:
            train_params["model"] = train_params.get("model") or config.model
        else:
            train_inputs["model"] = train_stage(run.init_from)
        if run.method == "qad":
            if run.teacher == BASE_MODEL:
                train_params["qad"]["teacher_model"] = train_params["qad"].get("teacher_model") or config.model
            else:
                train_inputs["teacher"] = train_stage(run.teacher)
        if run.ptq:
            ptq_params = {**config.ptq.model_dump(mode="json"), "recipe": run.recipe,
                          "backend": run.backend, "model": train_params.get("model")}
            ptq_inputs = {"data": PREPROCESS}
            if "model" in train_inputs:
                ptq_inputs["model"] = train_inputs["model"]
            stages.append(Stage(f"ptq-{name}", "ptq", ptq_params, ptq_inputs,
                                resources["ptq"], images["ptq"], tags))
            stages.append(Stage(f"eval-ptq-{name}", "eval", {**eval_params, "recipe": run.recipe},
                                {"data": PREPROCESS, "model": f"ptq-{name}"},
                                resources["eval"], images["eval"], {**tags, "phase": "ptq"}))
            report_inputs[f"eval-ptq-{name}"] = f"eval-ptq-{name}"
            train_inputs["model"] = f"ptq-{name}"
        stages.append(Stage(train_stage(name), "train", train_params, train_inputs,
                            config.run_resources(name), images["train"], tags))
        report_inputs[train_stage(name)] = train_stage(name)
        if run.export:
            stages.append(Stage(f"export-{name}", "export", config.export_params(name).model_dump(mode="json"),
                                {"model": train_stage(name), "data": PREPROCESS}, resources["export"],
                                images["export"], tags))
        if run.export and run.evaluate:
            stages.append(Stage(f"eval-{name}", "eval", {**eval_params, "recipe": run.recipe},
                                {"data": PREPROCESS, "model": f"export-{name}"},
                                resources["eval"], images["eval"], tags))
            report_inputs[f"eval-{name}"] = f"eval-{name}"

    report_params = {**config.report.model_dump(mode="json"), "study": config.study,
                     "description": config.description}
    stages.append(Stage(REPORT, "report", report_params, report_inputs,
                        resources["report"], images["report"]))
    return Graph(stages)


def image_refs(config: StudyConfig) -> dict[str, str]:
    return dict(config.images.refs)
