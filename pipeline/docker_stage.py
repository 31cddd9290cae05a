"""Runs one stage's container and mirrors it as a process (the local driver's child):

    python -m pipeline.docker_stage --image REF --spec SPEC --root ROOT --name NAME
        [--network none] [--gpus 0,1] [--shm-gb 1] -- python -m stages.<kind> --spec SPEC

- The artifact root is bind-mounted at the same path, so the spec's paths hold inside; absolute
  paths in the spec's params that exist here (a local model, a tokenizer) are mounted read-only
  at the same path too. Every mount is listed in the stage log.
- Runs as this user's uid:gid, so the stage's files belong to whoever started the run.
- Container output goes to stdout (the driver points it at the stage log); SIGTERM/SIGINT stop
  the container (SIGTERM, then SIGKILL after STOP_GRACE_S) and the exit code is passed back.
- `<stage>/container.json` records what ran: image ref, image id, container, command, mounts.
- A container left by a runner that was killed outright is removed before a new one starts.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from contract.device_sharing import LEDGER_ENV
from contract.files import write_json_atomic
from contract.markers import mark_failed
from contract.spec import load_spec
from pipeline.errors import BackendError

CONTAINER_RECORD = "container.json"
STOP_GRACE_S = 15  # below the driver's grace, so the driver never has to SIGKILL this runner
STAGE_DIR_LABEL = "org.faster-qat.stage-dir"


def param_paths(value: Any, root: Path) -> list[Path]:
    """Absolute paths named in params that exist on this machine and lie outside the root."""
    found: list[Path] = []
    if isinstance(value, dict):
        for item in value.values():
            found += param_paths(item, root)
    elif isinstance(value, list):
        for item in value:
            found += param_paths(item, root)
    elif isinstance(value, str) and value.startswith("/") and "\n" not in value:
        path = Path(value)
        if path.exists() and not path.resolve().is_relative_to(root):
            found.append(path.resolve())
    return sorted(set(found))


def run_container(args: argparse.Namespace) -> int:
    from pipeline.docker_runtime import resolve_local_image
    from pipeline.images import docker_client

    spec = load_spec(args.spec)
    root = args.root.resolve()
    client = docker_client()
    image = resolve_local_image(client, args.image)
    _remove_leftovers(client, spec.output_dir)
    volumes = {str(root): {"bind": str(root), "mode": "rw"}}
    for path in param_paths(spec.params, root):
        volumes[str(path)] = {"bind": str(path), "mode": "ro"}
    gpus = [part for part in (args.gpus or "").split(",") if part]
    record: dict[str, Any] = {
        "image_ref": args.image, "image_id": image.id, "repo_digests": image.attrs.get("RepoDigests", []),
        "container_name": args.name, "command": args.command, "network": args.network, "gpus": gpus,
        "mounts": {host: bind["mode"] for host, bind in volumes.items()}, "started_at": time.time(),
    }
    print(f"=== container {args.name}: image {args.image} ({image.id})", flush=True)
    for host, bind in volumes.items():
        print(f"=== mount {host} ({bind['mode']})", flush=True)
    # Handlers first: a SIGTERM while the container is being created must still stop it.
    stopper = _Stopper()
    previous = {sig: signal.signal(sig, stopper.request) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run_and_follow(client, image, args, spec, volumes, gpus, record, stopper)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_and_follow(client: Any, image: Any, args: argparse.Namespace, spec: Any,
                    volumes: dict, gpus: list[str], record: dict[str, Any], stopper: _Stopper) -> int:
    import docker
    from docker.types import DeviceRequest

    if stopper.requested:
        return 143
    container = client.containers.run(
        image.id, args.command, name=args.name, detach=True, network_mode=args.network,
        user=f"{os.getuid()}:{os.getgid()}", working_dir=str(args.root.resolve()), volumes=volumes,
        environment={"PYTHONUNBUFFERED": "1", "HOME": "/tmp", "PIPELINE_JOB_ID": args.name,
                     # the driver's placement record, under the mounted root (contract/device_sharing.py)
                     **{k: os.environ[k] for k in (LEDGER_ENV,) if k in os.environ}},
        device_requests=[DeviceRequest(device_ids=gpus, capabilities=[["gpu"]])] if gpus else None,
        shm_size=f"{int(args.shm_gb * 1024)}m", init=True,
        labels={STAGE_DIR_LABEL: str(spec.output_dir), "org.faster-qat.run": spec.run_id},
    )
    try:
        stopper.attach(container)
        record["container_id"] = container.id
        write_json_atomic(spec.output_dir / CONTAINER_RECORD, record)
        for chunk in container.logs(stream=True, follow=True):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        exit_code = int(container.wait().get("StatusCode", 1))
    finally:
        try:
            container.remove(force=True)
        except docker.errors.APIError:
            pass
    record.update(exit_code=exit_code, finished_at=time.time(), stopped=stopper.requested)
    write_json_atomic(spec.output_dir / CONTAINER_RECORD, record)
    return exit_code


class _Stopper:
    """Stops the container from a signal handler without blocking the log stream."""

    def __init__(self) -> None:
        self.container: Any = None
        self.requested = False

    def attach(self, container: Any) -> None:
        self.container = container
        if self.requested:  # the signal came while the container was being created
            self._start_stop()

    def request(self, signum: int, frame: object) -> None:
        if self.requested:
            return
        self.requested = True
        if self.container is not None:
            self._start_stop()

    def _start_stop(self) -> None:
        threading.Thread(target=self._stop, daemon=True).start()

    def _stop(self) -> None:
        try:
            self.container.stop(timeout=STOP_GRACE_S)
        except Exception:
            pass


def _remove_leftovers(client: Any, stage_dir: Path) -> None:
    for old in client.containers.list(all=True, filters={"label": f"{STAGE_DIR_LABEL}={stage_dir}"}):
        print(f"=== removing container {old.name} left by an earlier runner", flush=True)
        old.remove(force=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--spec", required=True, type=Path)
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--network", default="none")
    parser.add_argument("--gpus", default="")
    parser.add_argument("--shm-gb", type=float, default=1.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        return run_container(args)
    except BackendError as error:
        return _fail(args.spec, str(error))
    except Exception as error:  # the engine refused (bad network name, no GPU runtime, ...)
        return _fail(args.spec, f"docker: {type(error).__name__}: {str(error).splitlines()[0][:300]}")


def _fail(spec_path: Path, message: str) -> int:
    """Nothing ran: say why in the stage log and in the _FAILED marker the driver reports."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    try:
        spec = load_spec(spec_path)
        mark_failed(spec.output_dir, spec.fingerprint, message, 2)
    except Exception:
        pass
    return 2


if __name__ == "__main__":
    sys.exit(main())
