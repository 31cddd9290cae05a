"""Runs rendered Jobs as a kubelet would, on this machine: every Job at once, each pod's init
containers in order and then its main container, as local subprocesses (`sh -c`, as the pod
spec says). The artifact PVC is a local directory: the volume's mount path (and the specs
ConfigMap's) is rewritten to local folders in commands, env and ConfigMap data. The Job
controller's part is played for backoffLimit, podFailurePolicy (FailJob on exit codes) and
Indexed completions; everything else in the objects runs for real.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.backends.k8s_commands import SPECS_MOUNT

REPO = Path(__file__).resolve().parents[3]


@dataclass
class JobResult:
    name: str
    condition: str  # Complete | Failed
    reason: str = ""
    exit_codes: list[tuple[str, int]] = field(default_factory=list)  # (container, code) per run


class PodHarness:
    def __init__(self, objects: list[dict[str, Any]], volume_root: Path, mount_path: str,
                 secrets: dict[tuple[str, str], str] | None = None) -> None:
        self.objects = objects
        self.volume_root = Path(volume_root)
        self.mount_path = mount_path
        self.specs_dir = self.volume_root.parent / "configmap-specs"
        self.secrets = secrets or {}
        self.results: dict[str, JobResult] = {}

    def _local(self, text: str) -> str:
        return text.replace(SPECS_MOUNT, str(self.specs_dir)).replace(self.mount_path, str(self.volume_root))

    def run(self, timeout_s: float) -> dict[str, JobResult]:
        self.volume_root.mkdir(parents=True, exist_ok=True)
        self.specs_dir.mkdir(parents=True, exist_ok=True)
        for obj in self.objects:
            if obj["kind"] == "ConfigMap":
                for key, value in obj["data"].items():
                    (self.specs_dir / key).write_text(self._local(value))
        jobs = [obj for obj in self.objects if obj["kind"] == "Job"]
        threads = [threading.Thread(target=self._run_job, args=(job, timeout_s), daemon=True) for job in jobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout_s + 30)
        return self.results

    def _run_job(self, job: dict[str, Any], timeout_s: float) -> None:
        spec = job["spec"]
        name = job["metadata"]["name"]
        result = JobResult(name, "Failed", "BackoffLimitExceeded")
        deadline = min(timeout_s, spec.get("activeDeadlineSeconds", timeout_s))
        for _attempt in range(spec.get("backoffLimit", 6) + 1):
            indexed = spec.get("completionMode") == "Indexed"
            outcomes: list[tuple[str, int] | None] = [None] * spec.get("completions", 1)

            def pod(index: int) -> None:
                outcomes[index] = self._run_pod(job, index if indexed else None, deadline)

            threads = [threading.Thread(target=pod, args=(i,)) for i in range(len(outcomes))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            result.exit_codes += [o for o in outcomes if o is not None]
            failures = [o for o in outcomes if o is not None and o[1] != 0]
            if not failures:
                result.condition, result.reason = "Complete", ""
                break
            if any(_fail_job(spec, container, code) for container, code in failures):
                result.reason = "PodFailurePolicy"
                break
        self.results[name] = result

    def _run_pod(self, job: dict[str, Any], index: int | None, deadline: float) -> tuple[str, int]:
        pod = job["spec"]["template"]["spec"]
        hostname = f"{job['metadata']['name']}-{index if index is not None else 0}"
        for container in pod.get("initContainers", []) + pod["containers"]:
            code = self._run_container(container, hostname, index, deadline)
            if code != 0:
                return container["name"], code
        return pod["containers"][-1]["name"], 0

    def _run_container(self, container: dict[str, Any], hostname: str, index: int | None, deadline: float) -> int:
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": str(REPO),
               "HOSTNAME": hostname, "HOME": str(self.volume_root.parent)}
        if index is not None:
            env["JOB_COMPLETION_INDEX"] = str(index)
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = self._local(item["value"])
            elif "fieldRef" in item["valueFrom"]:
                env[item["name"]] = str(index or 0)
            else:
                ref = item["valueFrom"]["secretKeyRef"]
                value = self.secrets.get((ref["name"], ref["key"]))
                if value is None and not ref.get("optional"):
                    return 1  # CreateContainerConfigError in a real kubelet
                if value is not None:
                    env[item["name"]] = value
        command = [self._local(part) for part in container["command"]]
        process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            return process.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 15)
            return process.wait()


def _fail_job(spec: dict[str, Any], container: str, code: int) -> bool:
    for rule in spec.get("podFailurePolicy", {}).get("rules", []):
        on_codes = rule.get("onExitCodes")
        if rule["action"] == "FailJob" and on_codes and on_codes.get("containerName", container) == container \
                and on_codes["operator"] == "In" and code in on_codes["values"]:
            return True
    return False
