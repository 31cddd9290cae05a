"""MLflow tracking of a pipeline run, made where the study runs and safe against outages and retries.

Both planes use this module: a stage writes its events here; the stage, the local driver or
`python -m pipeline sync` delivers them.

Every call is first appended to `<stage>/tracking/events.jsonl` (the durable record, in the
format below), then forwarded to MLflow. When MLflow is unreachable the stage keeps working; the
events wait in the file and the next flush (or `sync`) sends the ones not yet acknowledged. The
acknowledged position is kept in `tracking/synced.json`, so a replay sends nothing twice.

No run id exists before the study runs: the experiment is found or made by name, the parent run
by the pipeline run id (tag `faster_qat.run_key`), each stage's run by (run, stage, attempt) (tag
`faster_qat.stage_key`; the attempt is written once into the stage's first event, so a resumed
or retried stage keeps its run).

Runs have no unique key in MLflow, so a create is never retried blindly: it goes out once, without
MLflow's HTTP retries; when its answer is lost (or a 5xx comes back) the key is searched, the run
found is used, and only when none is found is the create sent again. A lost answer and a retry
therefore leave exactly one run, deleted ones included.

Racers (two pods of one stage attempt, stages making the parent run at once) can each search,
find nothing and create: MLflow cannot stop that. They agree through a write-once claim per key:
the only unique constraint MLflow's API offers is the experiment name, so the claim is an
experiment named after the key (`faster_qat.claim/<sha256>/<generation>`), created with the chosen
run id as a tag and deleted at once (hidden from the UI; the deleted name stays taken until
`mlflow gc`). The first claim wins whatever the clocks or delays; every process uses the claimed
run and deletes the other runs of the key it sees (each at least its own). Limits: a race still
leaves the losers' runs behind as deleted runs (none is ever logged to); a claimed run that a
user deletes moves the key to the claim's next generation (a new run); `mlflow gc` frees the
claims' names, and the next election then finds the one surviving run.

Event format (one JSON object a line): `create_run` {run_name, tags, attempt}, `params` {params},
`tags` {tags, parent?}, `metrics` {metrics, step, ts, parent? | stage?}, `artifact` {path,
artifact_path, parent?}, `experiment_tags` {tags}, `end` {status}. `parent: true` addresses the
pipeline run's parent run (the report); `stage: NAME` another stage's run of the same pipeline run.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.files import write_json_atomic
from contract.spec import TrackingRef

RUN_KEY_TAG = "faster_qat.run_key"
STAGE_KEY_TAG = "faster_qat.stage_key"
# A study trains models: MLflow's "model training" kind, not its GenAI default. The tag is what
# the API and older 3.x UIs read; 3.17's UI ignores it: the URL's `workflowType` decides (the link
# `pipeline report` prints carries it), else the browser's last choice (stages/report/mlflow_view.py).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")

TRACKING_DIR = "tracking"
EVENTS_FILE = "events.jsonl"
SYNCED_FILE = "synced.json"

# MLflow's own limits per log_batch call.
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_PER_BATCH = 100
_PARAM_VALUE_LIMIT = 6000
# How long to stay offline before trying the server again.
_RETRY_AFTER_S = 30.0


@dataclass
class _SyncState:
    acked: int = 0  # number of events already delivered
    run_id: str | None = None
    parent_run_id: str | None = None
    experiment_id: str | None = None

    @classmethod
    def load(cls, path: Path) -> _SyncState:
        try:
            payload = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        return cls(acked=int(payload["acked"]), run_id=payload.get("run_id"),
                   parent_run_id=payload.get("parent_run_id"), experiment_id=payload.get("experiment_id"))

    def save(self, path: Path) -> None:
        write_json_atomic(path, {"acked": self.acked, "run_id": self.run_id, "parent_run_id": self.parent_run_id,
                                 "experiment_id": self.experiment_id})


@dataclass
class StageTracker:
    """Logs one stage's nested MLflow run, buffering to disk first."""

    stage_dir: Path
    ref: TrackingRef | None
    run_name: str
    _offline_since: float | None = field(default=None, init=False)
    _warned: bool = field(default=False, init=False)

    @property
    def events_path(self) -> Path:
        return self.stage_dir / TRACKING_DIR / EVENTS_FILE

    @property
    def synced_path(self) -> Path:
        return self.stage_dir / TRACKING_DIR / SYNCED_FILE

    def start(self, tags: dict[str, str]) -> None:
        """Open the nested run (once per stage dir: a resumed stage keeps its run and attempt)."""
        first = {"type": "create_run", "run_name": self.run_name, "attempt": uuid.uuid4().hex[:12],
                 "tags": {**tags, "host": socket.gethostname()}}
        _create_exclusively(self.events_path, json.dumps(first, default=str) + "\n")
        self.flush()

    def log_params(self, params: dict[str, Any]) -> None:
        flat = {k: str(v)[:_PARAM_VALUE_LIMIT] for k, v in _flatten(params).items()}
        self._append({"type": "params", "params": flat})
        self.flush()

    def set_tags(self, tags: dict[str, str]) -> None:
        self._append({"type": "tags", "tags": {k: str(v) for k, v in tags.items()}})
        self.flush()

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        self._append(
            {"type": "metrics", "metrics": values, "step": step or 0, "ts": int(time.time() * 1000)}
        )
        self.flush()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Log a file or folder inside the stage dir (kept there, so a later sync can send it)."""
        relative = Path(path).resolve().relative_to(self.stage_dir.resolve())
        self._append({"type": "artifact", "path": str(relative), "artifact_path": artifact_path})
        self.flush()

    def log_parent_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Log to the pipeline run's parent run (the report: what a user opens first)."""
        relative = Path(path).resolve().relative_to(self.stage_dir.resolve())
        self._append({"type": "artifact", "path": str(relative), "artifact_path": artifact_path,
                      "parent": True})
        self.flush()

    def set_parent_tags(self, tags: dict[str, str]) -> None:
        self._append({"type": "tags", "tags": {k: str(v) for k, v in tags.items()}, "parent": True})
        self.flush()

    def log_parent_metrics(self, metrics: dict[str, float]) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        self._append({"type": "metrics", "metrics": values, "step": 0,
                      "ts": int(time.time() * 1000), "parent": True})
        self.flush()

    def mlflow_ids(self) -> tuple[str, str] | None:
        """(experiment id, parent run id) once the stage's run exists in MLflow; None before."""
        state = _SyncState.load(self.synced_path)
        if state.experiment_id is None or state.parent_run_id is None:
            return None
        return state.experiment_id, state.parent_run_id

    def log_stage_metrics(self, stage: str, metrics: dict[str, float]) -> None:
        """Log to another stage's run of the same pipeline run (the report puts each row's
        comparison metrics on the stage run that row stands for); sent once that run exists."""
        values = {k: float(v) for k, v in metrics.items()}
        self._append({"type": "metrics", "metrics": values, "step": 0,
                      "ts": int(time.time() * 1000), "stage": stage})
        self.flush()

    def set_stage_tags(self, stage: str, tags: dict[str, str]) -> None:
        """Tags on another stage's run of the same pipeline run (the report's yes/no facts about
        a row: a tag, not a metric, so the chart view draws only numbers); sent once that run
        exists."""
        self._append({"type": "tags", "tags": {k: str(v) for k, v in tags.items()}, "stage": stage})
        self.flush()

    def set_experiment_tags(self, tags: dict[str, str]) -> None:
        """Tags of the study's experiment (e.g. a saved view of its runs page)."""
        self._append({"type": "experiment_tags", "tags": {k: str(v) for k, v in tags.items()}})
        self.flush()

    def finish(self, status: str) -> bool:
        """Close the run; retries across a short blip (7.5 s) when MLflow answered until now, once
        when this stage found it unreachable already (`pipeline sync` delivers it later; waiting
        would only hold up the stages after this one). True when all was sent."""
        self._append({"type": "end", "status": status})
        for delay in (0.0,) if self._warned else (0.0, 0.5, 1.0, 2.0, 4.0):
            time.sleep(delay)
            self._offline_since = None
            if self.flush():
                return True
        return False

    def flush(self) -> bool:
        """Send pending events; True when nothing is left pending."""
        if self.ref is None:
            return True
        if self._offline_since and time.monotonic() - self._offline_since < _RETRY_AFTER_S:
            return False
        try:
            sync_stage_events(self.stage_dir, self.ref)
        except Exception as error:  # any transport or server error: stay offline, keep working
            self._offline_since = time.monotonic()
            if not self._warned:
                print(
                    f"[tracking] MLflow unreachable ({type(error).__name__}: {str(error)[:160]}); "
                    f"buffering to {self.events_path}, send later with `python -m pipeline sync`",
                    file=sys.stderr,
                    flush=True,
                )
                self._warned = True
            return False
        self._offline_since = None
        return True

    def _append(self, event: dict[str, Any]) -> None:
        with self.events_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(event, default=str) + "\n")
            handle.flush()


def read_events(stage_dir: Path) -> list[dict[str, Any]]:
    path = stage_dir / TRACKING_DIR / EVENTS_FILE
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is not yet written
    return events


def pending_event_count(stage_dir: Path) -> int:
    state = _SyncState.load(stage_dir / TRACKING_DIR / SYNCED_FILE)
    return max(0, len(read_events(stage_dir)) - state.acked)


# MLflow's HTTP client retries 7 times with exponential backoff (minutes) by default: a stage
# must notice an outage in seconds and keep training, so fail fast unless the user says otherwise.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


def sync_stage_events(stage_dir: Path, ref: TrackingRef) -> int:
    """Deliver the events after the acknowledged position; returns how many were sent."""
    from mlflow.entities import Metric, Param, RunTag

    synced_path = stage_dir / TRACKING_DIR / SYNCED_FILE
    state = _SyncState.load(synced_path)
    events = read_events(stage_dir)
    if state.acked >= len(events):
        return 0
    client = tracking_client(ref)
    sent = 0
    for event in events[state.acked :]:
        kind = event["type"]
        if kind == "create_run":
            if state.run_id is None:
                experiment_id = experiment_id_of(client, ref)
                state.experiment_id = experiment_id
                state.parent_run_id = parent_run_id_of(client, ref, experiment_id)
                key = f"{ref.run_key}/{event['run_name']}/{event.get('attempt', '0')}"
                tags = {**event["tags"], "mlflow.parentRunId": state.parent_run_id}
                state.run_id = get_or_create_run(client, experiment_id, STAGE_KEY_TAG, key,
                                                 event["run_name"], tags)
        elif state.run_id is None:
            raise RuntimeError(f"{stage_dir}: tracking events without a create_run event")
        elif kind == "params":
            items = [Param(k, v) for k, v in event["params"].items()]
            for chunk in _chunks(items, _MAX_PARAMS_PER_BATCH):
                client.log_batch(state.run_id, params=chunk)
        elif kind == "tags":
            target = _event_target(event, state, stage_dir)
            client.log_batch(target, tags=[RunTag(k, v) for k, v in event["tags"].items()])
        elif kind == "metrics":
            target = _event_target(event, state, stage_dir)
            items = [Metric(k, v, event["ts"], event["step"]) for k, v in event["metrics"].items()]
            for chunk in _chunks(items, _MAX_METRICS_PER_BATCH):
                client.log_batch(target, metrics=chunk)
        elif kind == "artifact":
            target = state.parent_run_id if event.get("parent") else state.run_id
            local = stage_dir / event["path"]
            if local.is_dir():
                client.log_artifacts(target, str(local), event.get("artifact_path"))
            elif local.exists():
                client.log_artifact(target, str(local), event.get("artifact_path"))
        elif kind == "experiment_tags":
            experiment_id = experiment_id_of(client, ref)
            for key, value in event["tags"].items():
                client.set_experiment_tag(experiment_id, key, value)
        elif kind == "end":
            client.set_terminated(state.run_id, status=event["status"])
        state.acked += 1
        sent += 1
        state.save(synced_path)
    return sent


def tracking_client(ref: TrackingRef) -> Any:
    """An MlflowClient of the study's store; the embedded sqlite store in WAL mode, so several
    stages log at once (a busy writer waits instead of failing). Its HTTP requests fail fast
    (_HTTP_DEFAULTS) unless the environment says otherwise."""
    for name, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    from mlflow.tracking import MlflowClient

    if ref.tracking_uri.startswith("sqlite:///"):
        path = Path(ref.tracking_uri.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(path, timeout=30) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
    return MlflowClient(tracking_uri=ref.tracking_uri)


def experiment_id_of(client: Any, ref: TrackingRef) -> str:
    """The study's experiment, made if missing (a concurrent create is no error)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(ref.experiment)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise RuntimeError(f"MLflow experiment '{ref.experiment}' is deleted: restore it "
                               "(mlflow experiments restore) or set tracking.experiment")
        if EXPERIMENT_KIND[0] not in found.tags:
            client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
        return found.experiment_id
    try:
        return client.create_experiment(ref.experiment, artifact_location=ref.artifact_location,
                                        tags=dict([EXPERIMENT_KIND]))
    except MlflowException:
        found = client.get_experiment_by_name(ref.experiment)
        if found is None:
            raise
        return found.experiment_id


def parent_run_id_of(client: Any, ref: TrackingRef, experiment_id: str | None = None) -> str:
    """The pipeline run's parent run, found by its key or made (one per run id, ever)."""
    experiment_id = experiment_id or experiment_id_of(client, ref)
    return get_or_create_run(client, experiment_id, RUN_KEY_TAG, ref.run_key, ref.run_key,
                             {"pipeline.run_id": ref.run_key})


def get_or_create_run(client: Any, experiment_id: str, key_tag: str, key: str, run_name: str,
                      tags: dict[str, str]) -> str:
    """The one run tagged `key_tag=key`, made if none: idempotent under lost responses and races.

    The create is sent once (`_create_run_once`); when its answer does not come, the key tells
    whether the server made the run. Racers that each made one agree through the key's claim
    (`_elect`) and delete the runs that lost."""
    candidates = (_runs_with_key(client, experiment_id, key_tag, key)
                  or _create_or_find(client, experiment_id, key_tag, key, run_name, tags))
    earliest = min(candidates, key=lambda run: (run.info.start_time, run.info.run_id))
    chosen = _elect(client, experiment_id, key_tag, key, earliest.info.run_id)
    for run in candidates:
        if run.info.run_id != chosen:
            _delete_quietly(client, run.info.run_id)
    return chosen


# A create whose answer is lost is tried again only after the key says the server did not make it.
_CREATE_ATTEMPTS = (0.0, 0.5, 1.0)


def _create_or_find(client: Any, experiment_id: str, key_tag: str, key: str, run_name: str,
                    tags: dict[str, str]) -> list[Any]:
    """[our new run], or the runs of the key when a create made one though its answer was lost."""
    from mlflow.exceptions import MlflowException

    for attempt, delay in enumerate(_CREATE_ATTEMPTS):
        time.sleep(delay)
        try:
            return [_create_run_once(client, experiment_id, run_name, {**tags, key_tag: key})]
        except MlflowException as error:
            if not _outcome_unknown(error) or attempt == len(_CREATE_ATTEMPTS) - 1:
                raise
            # No answer or a 5xx: a dead server fails this search too (fast: stages keep
            # working), a live one says whether the create made the run.
            found = _runs_with_key(client, experiment_id, key_tag, key)
            if found:
                return found
    raise AssertionError("unreachable: the last attempt returns or raises")


def _create_run_once(client: Any, experiment_id: str, run_name: str, tags: dict[str, str]) -> Any:
    """`create_run` without MLflow's HTTP retries: a retried create whose first answer was lost
    makes a second run (runs have no unique key), so the caller decides what to do instead."""
    from mlflow.entities import Run, RunTag
    from mlflow.protos.service_pb2 import CreateRun
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.utils.proto_json_utils import message_to_json, parse_dict
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    store = client._tracking_client.store
    if not isinstance(store, RestStore):  # an embedded store commits or raises: no lost answer
        return client.create_run(experiment_id, run_name=run_name, tags=tags)
    endpoint = "/api/2.0/mlflow/runs/create"
    body = CreateRun(experiment_id=str(experiment_id), run_name=run_name, start_time=int(time.time() * 1000),
                     tags=[RunTag(k, v).to_proto() for k, v in tags.items()])
    response = http_request(store.get_host_creds(), endpoint, "POST", max_retries=0,
                            json=json.loads(message_to_json(body)))
    response = verify_rest_response(response, endpoint)
    answer = CreateRun.Response()
    parse_dict(js_dict=response.json(), message=answer)
    return Run.from_proto(answer.run)


def _outcome_unknown(error: Any) -> bool:
    """The server may have made the run: no answer, or a 5xx/429 (a 4xx is a definite no)."""
    status = error.get_http_status_code()
    return status >= 500 or status == 429


def _runs_with_key(client: Any, experiment_id: str, key_tag: str, key: str) -> list[Any]:
    return client.search_runs([experiment_id], filter_string=f"tags.`{key_tag}` = '{key}'",
                              max_results=50)


# The write-once register that makes racers agree: MLflow's one unique constraint reachable through
# its API is the experiment name, so a key's claim is an experiment named after the key, created
# with the chosen run id as a tag and deleted at once (hidden from the UI, the name stays taken).
CLAIM_RUN_TAG = "faster_qat.claimed_run"
_MAX_CLAIM_GENERATIONS = 100


def _claim_name(experiment_id: str, key_tag: str, key: str, generation: int) -> str:
    digest = hashlib.sha256(f"{experiment_id}\n{key_tag}\n{key}".encode()).hexdigest()[:32]
    return f"faster_qat.claim/{digest}/{generation}"


def _elect(client: Any, experiment_id: str, key_tag: str, key: str, candidate: str) -> str:
    """The run of `key` every process uses: the first candidate written into the key's claim.
    A claimed run deleted since (by a user) moves the key to its next claim generation."""
    from mlflow.exceptions import MlflowException

    for generation in range(_MAX_CLAIM_GENERATIONS):
        name = _claim_name(experiment_id, key_tag, key, generation)
        claim = client.get_experiment_by_name(name)
        if claim is None:
            try:
                claim_id = client.create_experiment(name, tags={CLAIM_RUN_TAG: candidate, key_tag: key})
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":  # a racer's claim (or our own,
                    raise  # made by a retry whose first answer was lost): read it below
            else:
                _hide_claim(client, claim_id)
            claim = client.get_experiment_by_name(name)
        chosen = claim.tags[CLAIM_RUN_TAG]
        if chosen == candidate or _is_active(client, chosen):
            return chosen
    raise RuntimeError(f"{key_tag}={key}: {_MAX_CLAIM_GENERATIONS} claimed runs were deleted; "
                       "use a new run id")


def _is_active(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":  # purged by `mlflow gc`
            return False
        raise


def _hide_claim(client: Any, claim_id: str) -> None:
    try:
        client.delete_experiment(claim_id)
    except Exception:  # a claim left visible is only clutter: the name holds either way
        pass


def _delete_quietly(client: Any, run_id: str) -> None:
    try:
        client.delete_run(run_id)
    except Exception:  # already deleted by another racer
        pass


def close_parent_run(ref: TrackingRef, status: str) -> None:
    """Mark the pipeline run's parent run finished (FINISHED, FAILED or KILLED)."""
    try:
        client = tracking_client(ref)
        client.set_terminated(parent_run_id_of(client, ref), status=status)
    except Exception as error:  # the run's own results are on disk; say so and go on
        print(f"warning: could not close MLflow parent run: {type(error).__name__}: {str(error)[:200]}",
              file=sys.stderr)


def _create_exclusively(path: Path, content: str) -> bool:
    """Write `path` only if it does not exist, atomically (link of a complete temp file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_text(content, encoding="utf-8")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def stage_run_id(stage_dir: Path) -> str | None:
    return _SyncState.load(stage_dir / TRACKING_DIR / SYNCED_FILE).run_id


def _event_target(event: dict[str, Any], state: _SyncState, stage_dir: Path) -> str:
    """The run a metrics or tags event goes to: the parent, another stage's, or this stage's."""
    if event.get("parent"):
        return state.parent_run_id
    if event.get("stage"):
        # Stage dirs are <root>/<run>/<stage>: the other stage's run id is in its own sync state.
        run_id = stage_run_id(stage_dir.parent / event["stage"])
        if run_id is None:
            raise RuntimeError(f"{event['stage']}: its MLflow run does not exist yet; "
                               f"`python -m pipeline sync` sends these {event['type']} once it does")
        return run_id
    return state.run_id


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat
