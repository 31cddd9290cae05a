"""What the nemo-run backend asks NeMo-Run itself: that it imports, the states of an experiment's
tasks, and cancelling them. The one module of the control plane that imports `nemo_run`, and
only inside its functions: the optional extra is never needed to import the pipeline.

An experiment is found as NeMo-Run finds it (`run.Experiment.from_id`, under NEMORUN_HOME,
default ~/.nemo_run), so NeMo-Run's own tools (`nemo experiment status ID`) see it too.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pipeline.errors import BackendError, ConfigError

EXTRA_MISSING = "nemo-run: the optional extra is not installed: pip install -e '.[nemo]'"
# torchx's AppState names that mean the task still holds (or waits for) a place to run.
LIVE = ("SUBMITTED", "PENDING", "RUNNING")


def require_nemo_run() -> ModuleType:
    """`nemo_run`, or one line saying how to install it (ConfigError: exit 2, nothing started)."""
    try:
        import nemo_run
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] == "nemo_run":
            raise ConfigError(EXTRA_MISSING) from None
        raise ConfigError(f"nemo-run: the optional extra does not import ({error}); reinstall it: "
                          "pip install -c constraints.txt -e '.[nemo]'") from None
    except ImportError as error:
        raise ConfigError(f"nemo-run: the optional extra does not import ({error}); reinstall it: "
                          "pip install -c constraints.txt -e '.[nemo]'") from None
    return nemo_run


@dataclass(frozen=True)
class TaskState:
    state: str  # torchx's AppState name: UNSUBMITTED, SUBMITTED, PENDING, RUNNING, SUCCEEDED, FAILED...
    job_id: str  # the scheduler's id: a Slurm job id, a local app id


@contextlib.contextmanager
def _experiment(jobs: dict[str, Any]) -> Iterator[Any]:
    """The experiment, quiet; after use, the pipes of the commands its tunnel ran are closed.
    (invoke's runners hold them in reference cycles: a driver polling status every few seconds
    piled up hundreds of open pipes until a collection happened to run.)"""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # NeMo-Run's console chatter is not our output
            yield _find_experiment(jobs)
    finally:
        gc.collect()


def _find_experiment(jobs: dict[str, Any]) -> Any:
    run = require_nemo_run()
    from nemo_run.config import get_nemorun_home

    exp_id, recorded = jobs["experiment_id"], jobs.get("experiment_dir", "")
    title = exp_id.rpartition("_")[0]
    expected = os.path.join(get_nemorun_home(), "experiments", title, exp_id)
    if recorded and os.path.realpath(recorded) != os.path.realpath(expected):
        raise BackendError(f"nemo-run: experiment {exp_id} was recorded in {recorded}, but NEMORUN_HOME is "
                           f"{get_nemorun_home()}: set NEMORUN_HOME to the home it was submitted with")
    if not os.path.isfile(os.path.join(expected, "_TASKS")):
        raise BackendError(f"nemo-run: experiment {exp_id} has no task list in {expected} (not launched yet?)")
    return run.Experiment.from_id(exp_id)


def task_states(jobs: dict[str, Any]) -> dict[str, TaskState]:
    """Each task's state as NeMo-Run's scheduler tells it (Slurm: sacct through the tunnel;
    local: the state the experiment's driver last saved)."""
    with _experiment(jobs) as experiment:
        found = experiment.status(return_dict=True) or {}
    states = {}
    for name, info in found.items():
        state = info.get("status")
        states[name] = TaskState(getattr(state, "name", str(state)), str(info.get("job_id") or ""))
    return states


def cancel_tasks(jobs: dict[str, Any], names: list[str]) -> None:
    """Cancel these tasks through NeMo-Run (Slurm: scancel through the tunnel)."""
    with _experiment(jobs) as experiment:
        for name in names:
            experiment.cancel(name)
