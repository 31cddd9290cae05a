"""The study in the MLflow UI: comparison metrics on the stage runs, and a saved view that opens
the runs page where they compare.

- Each row of the table puts its numbers on the stage run it stands for (train-<run> for a
  trained run, eval-ptq-<run> for its PTQ model, eval-base for the base model), under the same
  names on every run: `study/*` the values, `study_ci/*` their intervals' bounds, `study_n/*`
  the sample sizes. The runs page sorts them as columns; its chart (compare) view draws each as
  a bar chart, the `study` section first. The row's yes/no facts (is the step-time ratio
  comparable, is the loss difference within noise) are tags `study.*` on the same run: a
  column, never an all-zero chart.
- Only the link decides the view. MLflow 3.17's UI chooses the GenAI or the model-training view
  in the browser: `WorkflowTypeProvider` (mlflow/server/js/src/common/contexts/
  WorkflowTypeContext.tsx) takes the URL's `workflowType`, else localStorage
  `mlflow.workflowType_v1` (the user's last switch), else `genai`; `useExperimentKind`
  (experiment-tracking/utils/ExperimentKindUtils.ts) reads the experiment's
  `mlflow.experimentKind` tag only when `shouldEnableWorkflowBasedNavigation()`
  (common/utils/FeatureUtils.ts) is false, and it is hard-wired to true. No tag, server option
  or environment variable reaches that choice, and the server never sees a route after '#', so
  the plain `#/experiments/<id>/runs` opens the GenAI view in a fresh browser. The same holds
  for the assistant panel: it opens once per browser profile on its own
  (`AssistantFloatingButton`: when the page's host is localhost, 127.0.0.1 or ::1 and localStorage
  `mlflow.assistant.fab.autoOpenedOnFirstLoad_v1` is unset), then stays as the user left it
  (`mlflow.assistant.panelOpen_v1`).
- A runs page's columns, sort and filter come back from a saved view: an experiment tag
  `mlflow.sharedViewState.<id>` whose value is {"name", "createdAt", "state"} (state: the page's
  search facets and UI state as JSON), opened by `#/experiments/<id>/runs?viewStateShareKey=<id>`.
  Sorting by a metric lists the nested stage runs flat instead of folded under the parent.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from stages.report.rows import StudyRow

# MLflow's chart view groups metrics into sections by the part of their name before "/": the
# comparison first, then the intervals' bounds, then the sample sizes.
PREFIX, INTERVAL_PREFIX, SIZE_PREFIX = "study/", "study_ci/", "study_n/"
TAG_PREFIX = "study."  # the row's yes/no facts: tags, so the chart view holds only numbers
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
WORKFLOW_PARAM = "workflowType=machine_learning"  # MLflow 3.17: the model-training UI
VIEW_FILE = "mlflow_view.json"  # in the report's folder: what `pipeline report` links to


def row_stage(row: StudyRow, stages: set[str]) -> str | None:
    """The stage whose MLflow run stands for this row."""
    candidates = {"base": ["eval-base"], "ptq": [f"eval-ptq-{row.run}"],
                  "trained": [f"train-{row.run}", f"eval-{row.run}"]}[row.phase]
    return next((stage for stage in candidates if stage in stages), None)


def comparison_metrics(row: StudyRow) -> dict[str, float]:
    """The row's numbers under the names every stage run shares."""
    values: dict[str, float | int | None] = {
        PREFIX + "val_loss_deployed": row.val_loss,
        PREFIX + "val_loss_deployed_vs_baseline_pct": row.val_loss_vs_baseline_pct,
        PREFIX + "step_time_s": row.step_time_s,
        PREFIX + "step_time_vs_baseline": row.step_time_vs_baseline,
        INTERVAL_PREFIX + "val_loss_deployed_low": row.val_loss_low,
        INTERVAL_PREFIX + "val_loss_deployed_high": row.val_loss_high,
        INTERVAL_PREFIX + "val_loss_deployed_vs_baseline_pct_low": row.val_loss_vs_baseline_pct_low,
        INTERVAL_PREFIX + "val_loss_deployed_vs_baseline_pct_high": row.val_loss_vs_baseline_pct_high,
        INTERVAL_PREFIX + "step_time_s_low": row.step_time_low,
        INTERVAL_PREFIX + "step_time_s_high": row.step_time_high,
        INTERVAL_PREFIX + "step_time_vs_baseline_low": row.step_time_vs_baseline_low,
        INTERVAL_PREFIX + "step_time_vs_baseline_high": row.step_time_vs_baseline_high,
        SIZE_PREFIX + "val_tokens": row.val_tokens,
        SIZE_PREFIX + "val_sequences": row.val_sequences,
        SIZE_PREFIX + "step_time_steps": row.step_time_steps,
    }
    for task, accuracy in row.accuracy.items():
        values |= {PREFIX + f"accuracy_{task}": accuracy.value,
                   INTERVAL_PREFIX + f"accuracy_{task}_low": accuracy.low,
                   INTERVAL_PREFIX + f"accuracy_{task}_high": accuracy.high,
                   SIZE_PREFIX + f"accuracy_{task}_questions": accuracy.n}
    return {name: float(value) for name, value in values.items() if value is not None}


def comparison_tags(row: StudyRow) -> dict[str, str]:
    """The row's yes/no facts, "true" or "false", where the row has them (the baseline has no
    difference to itself)."""
    facts = {TAG_PREFIX + "step_time_comparable": row.step_time_comparable,
             TAG_PREFIX + "val_loss_deployed_within_noise": row.val_loss_within_noise}
    return {name: str(value).lower() for name, value in facts.items() if value is not None}


def view_columns(tasks: list[str]) -> list[str]:
    """The runs page's columns: what a researcher compares, its sample sizes, what the run was."""
    values = ["val_loss_deployed", "val_loss_deployed_vs_baseline_pct", "step_time_vs_baseline", "step_time_s",
              *(f"accuracy_{task}" for task in tasks)]
    facts = ["step_time_comparable", "val_loss_deployed_within_noise"]
    sizes = ["val_tokens", "step_time_steps", *(f"accuracy_{task}_questions" for task in tasks)]
    return ([f"metrics.`{PREFIX}{name}`" for name in values] + [f"tags.`{TAG_PREFIX}{name}`" for name in facts]
            + [f"metrics.`{SIZE_PREFIX}{name}`" for name in sizes] + ["tags.`recipe`", "tags.`backend`"])


def view_state(parent_run_id: str, tasks: list[str]) -> dict[str, Any]:
    """Search facets and UI state of the runs page (ExperimentPageSearchFacetsState and
    ExperimentPageUIState in MLflow's UI): this pipeline run's stage runs, sorted by deployed
    val loss, with the comparison columns."""
    selected = view_columns(tasks)
    return {
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        "orderByKey": f"metrics.`{PREFIX}val_loss_deployed`",
        "orderByAsc": True,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": selected,
        # The grid applies widths only to the columns it is given an order for: these come first,
        # after the pinned run name; the others keep their places behind them.
        "columnOrder": selected,
        "columnWidths": {column: 40 + 7 * len(column.split("`")[1]) for column in selected},
        "runsExpanded": {},
        "runsPinned": [],
        "runsHidden": [],
        "runsVisibilityMap": {},
        "runsHiddenMode": "SHOW_ALL",
        "viewMaximized": False,
        "runListHidden": False,
        "isAccordionReordered": False,
        "groupBy": None,
        "groupsExpanded": {},
        "autoRefreshEnabled": False,
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
    }


def saved_view(name: str, state: dict[str, Any]) -> tuple[str, str, str]:
    """(view id, experiment tag key, tag value) of a saved view; the id hashes the state, so the
    same study saves the same view once."""
    state_json = json.dumps(state, sort_keys=True)
    view_id = hashlib.sha256(state_json.encode()).hexdigest()
    envelope = {"name": name, "createdAt": int(time.time() * 1000), "state": state_json}
    return view_id, VIEW_TAG_PREFIX + view_id, json.dumps(envelope)


def view_route(experiment_id: str, view_id: str) -> str:
    """The part of the UI's URL after '#'."""
    return (f"/experiments/{experiment_id}/runs?viewStateShareKey={view_id}"
            f"&{WORKFLOW_PARAM}&compareRunsMode=TABLE")
