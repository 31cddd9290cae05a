"""Image references, the lock file, and how a config takes its digests from it (no Docker)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import ImagesConfig
from pipeline.docker_runtime import DockerLauncher, container_name
from pipeline.image_lock import (
    ImageRef,
    ImageRefError,
    LockEntry,
    LockFile,
    pin_refs,
    read_lock,
    write_lock,
)
from pipeline.images import build_context, code_labels
from pipeline.resources import Resources
from pipeline.run_record import StageRecord

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text,expected", [
    ("faster-qat-cpu", ImageRef("faster-qat-cpu")),
    ("faster-qat-cpu:dev", ImageRef("faster-qat-cpu", "dev")),
    (f"faster-qat-cpu@{DIGEST}", ImageRef("faster-qat-cpu", None, DIGEST)),
    (f"localhost:5000/team/cpu:v1@{DIGEST}", ImageRef("localhost:5000/team/cpu", "v1", DIGEST)),
    ("localhost:5000/team/cpu", ImageRef("localhost:5000/team/cpu")),
])
def test_refs_parse_into_repository_tag_and_digest(text, expected):
    assert ImageRef.parse(text) == expected
    assert str(ImageRef.parse(text)) == text


@pytest.mark.parametrize("text,message", [
    ("cpu@sha256:abc", "the digest must be sha256: and 64 hex digits"),
    ("cpu:", "is not an image reference"),
    ("my image", "is not an image reference"),
])
def test_bad_refs_are_one_line_errors(text, message):
    with pytest.raises(ImageRefError, match=message):
        ImageRef.parse(text)


def _lock(tmp_path: Path, **refs: str) -> Path:
    path = tmp_path / "lock.yaml"
    write_lock(path, LockFile(images={name: LockEntry(ref=ref, pinned_by="image-id") for name, ref in refs.items()}))
    return path


def test_the_lock_pins_refs_of_the_same_repository_only(tmp_path):
    lock = read_lock(_lock(tmp_path, cpu=f"faster-qat-cpu:dev@{DIGEST}", train=f"other-train@{DIGEST}"))
    pinned = pin_refs({"cpu": "faster-qat-cpu:dev", "train": "faster-qat-train:dev",
                       "eval": f"faster-qat-eval@{DIGEST.replace('ab', 'cd')}"}, lock)
    assert pinned == {"cpu": f"faster-qat-cpu:dev@{DIGEST}",
                      "train": "faster-qat-train:dev",  # another repository: not this lock's image
                      "eval": f"faster-qat-eval@{DIGEST.replace('ab', 'cd')}"}  # already pinned: kept


def test_a_config_takes_its_digests_from_the_lock_file_and_strict_accepts_them(tmp_path):
    path = _lock(tmp_path, cpu=f"faster-qat-cpu:dev@{DIGEST}", train=f"faster-qat-train:dev@{DIGEST}")
    images = ImagesConfig(lock_file=str(path), strict=True)
    assert images.refs == {"cpu": f"faster-qat-cpu:dev@{DIGEST}", "train": f"faster-qat-train:dev@{DIGEST}"}
    assert ImagesConfig(lock_file=None).refs["cpu"] == "faster-qat-cpu:dev"


def test_the_lock_file_written_is_read_back_with_its_header(tmp_path):
    path = _lock(tmp_path, cpu=f"faster-qat-cpu:dev@{DIGEST}")
    assert path.read_text().startswith("# Container images pinned by digest")
    assert read_lock(path).images["cpu"].pinned_by == "image-id"


@pytest.mark.parametrize("body,message", [
    ("images: {cpu: {ref: 'faster-qat-cpu:dev', pinned_by: image-id}}\n", "images.cpu.ref: 'faster-qat-cpu:dev' has no @sha256: digest"),
    ("images: {cpu: {ref: x, pinned_by: guess}}\n", "images.cpu.pinned_by: Input should be"),
    ("images: [\n", "invalid YAML"),
])
def test_a_bad_lock_file_is_named_in_a_one_line_config_error(tmp_path, capsys, body, message):
    path = tmp_path / "lock.yaml"
    path.write_text(body)
    assert main(["validate", "-c", "smoke", "--set", f"images.lock_file={path}"]) == 2
    err = capsys.readouterr().err
    assert f"lock_file: {path}: {message}" in err and err.count("\n") == 1


def test_a_named_lock_file_must_exist(tmp_path, capsys):
    assert main(["validate", "-c", "smoke", "--set", f"images.lock_file={tmp_path}/none.yaml"]) == 2
    assert f"images: lock_file: {tmp_path}/none.yaml not found; run `python -m pipeline images lock`" in capsys.readouterr().err


def test_the_build_context_holds_the_image_folder_and_the_data_plane_only():
    with tarfile.open(fileobj=build_context("cpu")) as tar:
        names = tar.getnames()
    assert "images/cpu/Dockerfile" in names and "stages/runtime.py" in names and "contract/spec.py" in names
    assert not any(n.startswith(("pipeline/", "tests/", "images/train", ".git")) or "__pycache__" in n for n in names)
    assert {"org.faster-qat.code.probe", "org.faster-qat.code.train"} <= set(code_labels())


def test_the_docker_launcher_wraps_the_stage_command_in_the_container_runner():
    stage = StageRecord(kind="train", fingerprint="f", image=f"faster-qat-train@{DIGEST}",
                        resources=Resources(gpus_per_node=2, shm_gb=8))
    spec = Path("/data/runs/study/train-fp8/spec.json")
    command = DockerLauncher(network="host").command("train-fp8", stage, spec, [2, 3])
    split = command.index("--")
    assert command[1:3] == ["-m", "pipeline.docker_stage"]
    options = dict(zip(command[3:split:2], command[4:split:2]))
    assert options == {"--image": f"faster-qat-train@{DIGEST}", "--spec": str(spec), "--root": "/data/runs",
                       "--name": container_name(Path("/data/runs"), "study", "train-fp8"), "--network": "host", "--shm-gb": "8.0", "--gpus": "2,3"}
    assert command[split + 1:] == ["python", "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
                                   "--standalone", "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                                   "--shutdown-timeout=100", "-m", "stages.train", "--spec", str(spec)]


def _pins(path: Path) -> dict[str, str]:
    """name -> version of each `name[extras]==version` line (names compared as pip does)."""
    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.split("[")[0].lower().replace("_", "-")] = version
    return pins


@pytest.mark.parametrize("image", ["cpu", "train"])
def test_image_pins_are_the_versions_the_tests_ran_with(image):
    """An image installs what CI tested: each pin of its requirements.txt is constraints.txt's."""
    repo = Path(__file__).resolve().parents[2]
    tested = _pins(repo / "constraints.txt")
    image_pins = _pins(repo / "images" / image / "requirements.txt")
    assert len(image_pins) >= 10
    assert {name: (version, tested.get(name)) for name, version in image_pins.items() if tested.get(name) != version} == {}
