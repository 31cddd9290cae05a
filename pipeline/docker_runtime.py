"""`--runtime docker` for the local backend: each stage runs in its image, pinned by digest.

The driver still starts one child process per stage (so its pool, PDEATHSIG, SIGTERM handling
and logs work unchanged); that child is `python -m pipeline.docker_stage`, which runs the
stage's container through the Docker SDK and mirrors it: logs to the stage log, SIGTERM to
`docker stop`, the exit code back, the container removed. `DockerLauncher.check` runs once
before the first stage: every image must be pinned by digest, present here, and built from
the stages code of this checkout.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.launch import StageLaunch
from pipeline.backends.local_launch import FreshProcesses
from pipeline.errors import BackendError
from pipeline.fingerprint import code_version
from pipeline.image_lock import ImageRef
from pipeline.images import CODE_LABEL, docker_client
from pipeline.run_record import RunRecord, StageRecord

RUNTIMES = ("process", "fresh-process", "docker")
IN_CONTAINER_PYTHON = "python"


def resolve_local_image(client: Any, text: str) -> Any:
    """The local image a pinned reference names: by registry digest, else by image id."""
    import docker.errors

    ref = ImageRef.parse(text)
    if ref.digest is None:
        raise BackendError(
            f"image '{text}' has no @sha256: digest; --runtime docker runs pinned images only: "
            "`python -m pipeline images build` then `images lock`"
        )
    for candidate in (f"{ref.repository}@{ref.digest}", ref.digest):
        try:
            return client.images.get(candidate)
        except docker.errors.ImageNotFound:
            continue
        except docker.errors.APIError as error:
            if getattr(error, "status_code", None) not in (400, 404):
                raise
    raise BackendError(
        f"image {text} is not on this machine; `docker pull {ref.repository}@{ref.digest}` or "
        f"rebuild and relock (`python -m pipeline images build && python -m pipeline images lock`)"
    )


@dataclass
class DockerLauncher(FreshProcesses):
    """Each stage a fresh process that runs its container: the command is the container
    runner, not the stage itself."""

    network: str = "none"

    def check(self, record: RunRecord, names: list[str] | None = None) -> dict[str, str]:
        """Fail before anything starts (every stage of the run, or `names`): returns image
        reference -> local image id of what will run."""
        client = docker_client()
        ids: dict[str, str] = {}
        for name in names if names is not None else list(record.stages):
            stage = record.stages[name]
            image = resolve_local_image(client, stage.image)
            ids[stage.image] = image.id
            labels = image.attrs.get("Config", {}).get("Labels") or {}
            built_from = labels.get(CODE_LABEL + stage.kind)
            if built_from != code_version(stage.kind):
                raise BackendError(
                    f"stage {name}: image {stage.image} was built from other `stages/` code than this "
                    f"checkout's ({stage.kind}: {built_from or 'unlabelled'} != {code_version(stage.kind)}); "
                    "rebuild: `python -m pipeline images build` then `images lock`"
                )
        return ids

    def command(self, name: str, stage: StageRecord, spec_path: Path, gpus: list[int]) -> list[str]:
        inner = StageLaunch(stage.kind, str(spec_path), processes_per_node=stage.resources.processes_per_node,
                            python=IN_CONTAINER_PYTHON).argv()
        # <root>/<run>/<stage>/spec.json (RunLayout): the root is mounted, the run names the container
        root, run_id = spec_path.parents[2], spec_path.parents[1].name
        command = [sys.executable, "-m", "pipeline.docker_stage",
                   "--image", stage.image,
                   "--spec", str(spec_path),
                   "--root", str(root),
                   "--name", container_name(root, run_id, name),
                   "--network", self.network,
                   "--shm-gb", str(stage.resources.shm_gb)]
        if gpus:
            command += ["--gpus", ",".join(str(gpu) for gpu in gpus)]
        return [*command, "--", *inner]


def container_name(root: Path, run_id: str, stage: str) -> str:
    """`fq-<run>-<stage>-<hash of the root>`: one engine may hold runs of the same id under other
    artifact roots (or a container a killed driver left behind); names must not collide."""
    root_hash = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]
    return f"fq-{run_id}-{stage}-{root_hash}"
