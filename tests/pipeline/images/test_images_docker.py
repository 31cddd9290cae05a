"""Images built, locked and run through a real Docker engine, offline: the real
images/cpu/Dockerfile on a local base, pinned by digest, running probe stages in containers."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contract.markers import read_marker
from pipeline.cli import main
from pipeline.docker_runtime import DockerLauncher, container_name
from pipeline.docker_stage import STAGE_DIR_LABEL
from pipeline.errors import BackendError
from pipeline.image_lock import ImageRef, read_lock
from pipeline.loader import load_config
from tests.pipeline.images.docker_dag import drive_in_docker, probe_record
from tests.pipeline.probe_dag import fan_out_graph

REPO = Path(__file__).resolve().parents[3]
REFS = ["--set", "images.refs.cpu=faster-qat-cpu-test:dev",
        "--set", "images.refs.train=faster-qat-train-test:dev"]


@pytest.fixture(scope="session")
def lock_file(base_image, tmp_path_factory) -> Path:
    """`images build cpu` (offline, on the local base) then `images lock`, through the CLI."""
    path = tmp_path_factory.mktemp("lock") / "lock.yaml"
    assert main(["images", "build", "cpu", "-c", "smoke", *REFS, "--base", base_image,
                 "--build-arg", "INSTALL_DEPS=0", "--network", "none"]) == 0
    assert main(["images", "lock", "cpu", "-c", "smoke", *REFS, "--lock-file", str(path)]) == 0
    return path


@pytest.fixture(scope="session")
def cpu_ref(lock_file) -> str:
    config = load_config("smoke", [*REFS[1::2], f"images.lock_file={lock_file}"]).config
    return config.images.refs["cpu"]


def _containers(client, root: Path) -> list:
    # Sparse: the list call alone, so a container another test removes meanwhile is no error.
    listed = client.containers.list(all=True, sparse=True, filters={"label": STAGE_DIR_LABEL})
    return [c for c in listed if (c.attrs.get("Labels") or {}).get(STAGE_DIR_LABEL, "").startswith(str(root))]


def test_lock_pins_the_built_image_and_the_config_takes_its_digest(docker_client, lock_file, cpu_ref):
    entry = read_lock(lock_file).images["cpu"]
    image = docker_client.images.get("faster-qat-cpu-test:dev")
    assert entry.pinned_by == "image-id"  # never pushed: no registry digest to pin
    assert entry.ref == f"faster-qat-cpu-test:dev@{image.id}"
    assert cpu_ref == entry.ref  # the loader filled refs.cpu from the lock
    assert entry.code["probe"] == image.labels["org.faster-qat.code.probe"]


def test_a_probe_dag_runs_in_containers_and_records_the_digest(docker_client, cpu_ref, tmp_path):
    states = drive_in_docker(fan_out_graph(payloads={"join": "J"}), tmp_path, cpu_ref)
    assert set(states.values()) == {"succeeded"}
    run_dir = tmp_path / "probe"
    assert (run_dir / "join" / "output.txt").read_text() == "sourceasourcebsourcecsourcedJ"
    digest = ImageRef.parse(cpu_ref).digest
    spec = json.loads((run_dir / "join" / "spec.json").read_text())
    assert spec["tags"]["image"] == cpu_ref  # -> the stage's MLflow run tags
    assert json.loads((run_dir / "run.json").read_text())["stages"]["join"]["image"] == cpu_ref
    record = json.loads((run_dir / "join" / "container.json").read_text())
    assert record["image_id"] == digest
    assert record["exit_code"] == 0 and record["network"] == "none"
    assert record["command"] == ["python", "-m", "stages.probe", "--spec", str(run_dir / "join" / "spec.json")]
    log = (run_dir / "join" / "stage.log").read_text()
    name = container_name(tmp_path, "probe", "join")
    assert name.startswith("fq-probe-join-") and f"=== container {name}: image {cpu_ref}" in log
    assert "join: succeeded" in log  # the container's own output reached the stage log
    assert _containers(docker_client, tmp_path) == []  # removed after


def test_a_failing_stage_in_a_container_blocks_only_its_dependents(cpu_ref, tmp_path):
    states = drive_in_docker(fan_out_graph(fail="b"), tmp_path, cpu_ref)
    assert states == {"source": "succeeded", "a": "succeeded", "b": "failed", "c": "succeeded",
                      "d": "succeeded", "join": "blocked"}
    assert read_marker(tmp_path / "probe" / "b").error == "b: RuntimeError: probe asked to fail"
    assert json.loads((tmp_path / "probe" / "b" / "container.json").read_text())["exit_code"] == 1


def test_sigterm_of_the_driver_stops_and_removes_the_containers(docker_client, cpu_ref, tmp_path):
    driver = subprocess.Popen([sys.executable, "-m", "tests.pipeline.images.docker_dag",
                               str(tmp_path), cpu_ref, "--sleep", "60"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not any(c.status == "running" for c in _containers(docker_client, tmp_path)):
        assert time.time() < deadline and driver.poll() is None, driver.stdout.read() if driver.poll() is not None else "no container started"
        time.sleep(0.2)
    driver.send_signal(signal.SIGTERM)
    out, _ = driver.communicate(timeout=60)
    assert "source=interrupted" in out
    assert _containers(docker_client, tmp_path) == []
    assert read_marker(tmp_path / "probe" / "source") is None  # the next run resumes it
    assert json.loads((tmp_path / "probe" / "source" / "container.json").read_text())["stopped"] is True


def test_unpinned_missing_or_stale_images_are_refused_before_anything_starts(docker_client, base_image, cpu_ref,
                                                                            tmp_path):
    graph = fan_out_graph()
    with pytest.raises(BackendError, match="has no @sha256: digest; --runtime docker runs pinned images only"):
        DockerLauncher().check(probe_record(graph, tmp_path, "faster-qat-cpu-test:dev"))
    with pytest.raises(BackendError, match="is not on this machine"):
        DockerLauncher().check(probe_record(graph, tmp_path, "faster-qat-cpu-test@sha256:" + "0" * 64))
    dockerfile = f"FROM {base_image}\nLABEL org.faster-qat.code.probe=0123456789abcdef\n".encode()
    stale, _ = docker_client.images.build(fileobj=io.BytesIO(dockerfile), tag="faster-qat-stale-test:dev",
                                         rm=True, forcerm=True)
    with pytest.raises(BackendError, match=r"stage source: image .* was built from other `stages/` code"):
        DockerLauncher().check(probe_record(graph, tmp_path, f"faster-qat-stale-test:dev@{stale.id}"))


def test_cli_run_with_docker_runtime_refuses_unpinned_images_and_prepares_nothing(docker_client, tmp_path, capsys):
    code = main(["run", "-c", "smoke", *REFS, "--set", "images.lock_file=null", "--root", str(tmp_path),
                 "--runtime", "docker", "--plain"])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: image 'faster-qat-train-test:dev' has no @sha256: digest") or \
        err.startswith("error: image 'faster-qat-cpu-test:dev' has no @sha256: digest")
    assert "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_push_to_an_unreachable_registry_is_a_one_line_error(docker_client, lock_file, capsys):
    docker_client.images.get("faster-qat-cpu-test:dev").tag("localhost:1/faster-qat-cpu-test", "dev")
    code = main(["images", "push", "cpu", "-c", "smoke", "--set", "images.refs.cpu=localhost:1/faster-qat-cpu-test:dev",
                 "--set", "images.refs.train=faster-qat-train-test:dev"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: images push cpu: ") and "localhost:1" in err and err.count("\n") == 1
