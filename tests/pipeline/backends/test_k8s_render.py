"""Rendering the study as Kubernetes objects: schema-valid on two API versions, pinned by golden
files, and bad input refused in one line before anything is written.

Regenerate the goldens after an intended change: FASTER_QAT_REGEN_GOLDEN=1 pytest <this file>.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pipeline.backends.k8s import K8sBackend
from pipeline.backends.k8s_render import to_yaml
from pipeline.backends.k8s_settings import K8sSettings
from pipeline.layout import RunLayout
from pipeline.loader import load_config
from pipeline.plan import plan_run

REPO = Path(__file__).resolve().parents[3]
GOLDEN = Path(__file__).with_name("golden")
K8S_VERSIONS = ("1.34.0", "1.37.0")
ATTEMPT = "golden-attempt"


def render(tmp_path: Path, profile: str, *overrides: str) -> list[dict]:
    loaded = load_config(profile, ["k8s.tracking_uri=null", f"k8s.host_mounts=[{REPO}/fixtures]", *overrides])
    backend = K8sBackend(loaded.config.k8s or K8sSettings(), api=object())  # type: ignore[arg-type]
    layout = RunLayout(tmp_path / "runs", loaded.config.study)
    plan = plan_run(loaded.config, layout.run_id, backend.stage_root(layout), None, "k8s")
    return backend.objects(plan, plan.names, ATTEMPT)


def normalised(objects: list[dict], tmp_path: Path) -> str:
    """Fingerprints hash the stage code (it changes often) and paths name this checkout; the
    stage specs in the ConfigMap carry every stage's params, which their owners pin: here only
    their paths and run are kept, so a new train param does not churn these goldens."""
    objects = [_with_spec_summaries(obj) for obj in objects]
    text = to_yaml(objects)
    text = re.sub(r"\b[0-9a-f]{64}\b", "<fingerprint>", text)
    return text.replace(str(REPO), "<repo>").replace(str(tmp_path), "<tmp>")


def _with_spec_summaries(obj: dict) -> dict:
    if obj["kind"] != "ConfigMap":
        return obj
    summaries = {}
    for key, value in obj["data"].items():
        spec = json.loads(value)
        summaries[key] = json.dumps({k: spec[k] for k in ("run_id", "stage", "kind", "output_dir", "inputs",
                                                           "tracking")}, indent=2) + "\n"
    return {**obj, "data": summaries}


def validate_all(objects: list[dict]) -> None:
    for version in K8S_VERSIONS:
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("profile", ["smoke", "qwen3-8b-b200"])
def test_rendered_profiles_match_golden_files_and_validate(tmp_path, profile):
    objects = render(tmp_path, profile)
    validate_all(objects)
    golden = GOLDEN / f"k8s-{profile}.yaml"
    text = normalised(objects, tmp_path)
    if os.environ.get("FASTER_QAT_REGEN_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"rendered YAML differs from {golden}; see module docstring"


def test_gpu_stage_asks_for_gpus_shm_b200_nodes_and_a_deadline_covering_its_upstreams(tmp_path):
    objects = render(tmp_path, "qwen3-8b-b200",
                     "k8s.gpu_node_selector={nvidia.com/gpu.product: NVIDIA-B200}",
                     "k8s.queue_name=gpu-queue",
                     "k8s.secrets={HF_TOKEN: {secret: hf, key: token}}")
    jobs = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Job"}
    train = jobs["qwen3-8b-b200-train-fp8"]
    pod = train["spec"]["template"]["spec"]
    main = pod["containers"][0]
    assert main["resources"]["limits"] == {"cpu": "64", "memory": "1048576Mi", "nvidia.com/gpu": "8"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-B200"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "65536Mi"}} in pod["volumes"]
    assert "--nnodes=1 --nproc-per-node=8 --standalone" in main["command"][2]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in main["env"]
    assert train["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    # preprocess (120 min) then train (720 min), each with 60 min of queue slack
    assert train["spec"]["activeDeadlineSeconds"] == (120 + 60 + 720 + 60) * 60
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in pod["initContainers"] + pod["containers"]:
        assert set(container["resources"]["requests"]) >= {"cpu", "memory"}
    rule = train["spec"]["podFailurePolicy"]["rules"][0]
    assert rule == {"action": "FailJob", "onExitCodes": {"containerName": "wait-upstream",
                                                         "operator": "In", "values": [42]}}
    assert "wait_for preprocess /artifacts/qwen3-8b-b200/preprocess" in pod["initContainers"][0]["command"][2]
    validate_all(objects)


def test_a_cpu_request_lets_waiting_pods_hold_little_while_limits_stay(tmp_path):
    objects = render(tmp_path, "qwen3-8b-b200", "k8s.cpu_request=500m")
    train = next(o for o in objects if o["metadata"]["name"] == "qwen3-8b-b200-train-fp8")
    resources = train["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "500m", "memory": "1048576Mi", "nvidia.com/gpu": "8"}
    assert resources["limits"] == {"cpu": "64", "memory": "1048576Mi", "nvidia.com/gpu": "8"}
    validate_all(objects)


def test_multi_node_stage_is_an_indexed_job_with_a_headless_service(tmp_path):
    objects = render(tmp_path, "qwen3-8b-b200", "resources.train.nodes=2", "study=b200")
    services = [o for o in objects if o["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {f"b200-train-{r}" for r in
                                                        ("qat-nvfp4", "bf16", "fp8", "mxfp8", "nv4f-mx8b")}
    job = next(o for o in objects if o["metadata"]["name"] == "b200-train-bf16" and o["kind"] == "Job")
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["template"]["spec"]["subdomain"] == "b200-train-bf16"
    env = {e["name"]: e.get("value") for e in spec["template"]["spec"]["containers"][0]["env"]}
    assert env["MASTER_ADDR"] == "b200-train-bf16-0.b200-train-bf16"
    assert env["NCCL_NVLS_ENABLE"] == "0"
    assert "--nnodes=2 --nproc-per-node=8" in spec["template"]["spec"]["containers"][0]["command"][2]
    validate_all(objects)


def test_static_cluster_pieces_validate():
    for path in ("namespace.yaml", "rbac.yaml", "mlflow.yaml"):
        docs = list(yaml.safe_load_all((REPO / "k8s" / path).read_text()))
        assert docs
        validate_all(docs)
    kustomization = yaml.safe_load((REPO / "k8s" / "kustomization.yaml").read_text())
    assert all((REPO / "k8s" / r).is_file() for r in kustomization["resources"])


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "pipeline", "render", "--cluster", "k8s",
                           "--root", str(tmp_path / "runs"), "-o", str(tmp_path / "out"),
                           "--set", "k8s.tracking_uri=null", "--set", f"k8s.host_mounts=[{REPO}/fixtures]", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120, env=env)


@pytest.mark.parametrize("args, message", [
    (["--set", "k8s.artifacts.size=1TB"], "k8s.artifacts.size: '1TB' is not a Kubernetes quantity"),
    (["--set", "resources.report.memory_gb=0.0001"], "resources.report.memory_gb: 0.0001 GiB is below 1Mi"),
    (["--run-id", "a-run-id-that-is-much-too-long-for-kubernetes-jobs-x"], "characters (at most 63)"),
    (["--set", "images.strict=true"], "refs.cpu: 'faster-qat-cpu:dev' has no @sha256: digest"),
    (["--set", "k8s.secrets={HF_TOKN: {secret: hf, key: token}}"], "unknown secret env 'HF_TOKN'"),
    (["--set", "k8s.secrets={HF_TOKEN: {secret: hf, key: 'a b'}}"], "is not a valid Secret key"),
    (["--set", "k8s.tracking_uri=/tmp/mlruns"], "pods need an MLflow server URI"),
    (["--set", "k8s.host_mounts=[]"], "k8s: stage preprocess reads params.source = "),
    (["--set", "k8s.host_mounts=[relative/dir]"], "k8s.host_mounts: 'relative/dir' must be an absolute path"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    result = cli(tmp_path, "-c", "smoke", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_render_cli_writes_one_file_of_objects(tmp_path):
    result = cli(tmp_path, "-c", "smoke", "--run-id", "s1")
    assert result.returncode == 0, result.stderr
    docs = list(yaml.safe_load_all((tmp_path / "out" / "s1.yaml").read_text()))
    assert [d["kind"] for d in docs[:2]] == ["PersistentVolumeClaim", "ConfigMap"]
    assert sum(d["kind"] == "Job" for d in docs) == 28


DATA_PINNED = ("--set", f"data.source_revision={'c' * 40}")  # the profile leaves it unpinned


def test_the_study_scale_profile_names_its_unpinned_images_and_renders_digests_once_locked(tmp_path):
    unlocked = cli(tmp_path, "-c", "qwen3-8b-b200", "--set", "images.lock_file=null", *DATA_PINNED)
    assert unlocked.returncode == 0, unlocked.stderr
    assert unlocked.stderr.strip() == (
        "warning: image(s) cpu (faster-qat-cpu:dev), train (faster-qat-train:dev) not pinned by digest: "
        "`python -m pipeline images build|push|lock` fills images/lock.yaml (images.strict: true refuses "
        "unpinned images)")
    digests = {name: f"registry.example/faster-qat/{name}:dev@sha256:{digit * 64}"
               for name, digit in (("cpu", "1"), ("train", "2"))}
    lock = tmp_path / "lock.yaml"
    lock.write_text(yaml.safe_dump({"images": {name: {"ref": ref, "pinned_by": "registry-digest"}
                                                for name, ref in digests.items()}}))
    locked = cli(tmp_path, "-c", "qwen3-8b-b200", "--set", f"images.lock_file={lock}", *DATA_PINNED,
                 "--set", "images.refs={cpu: registry.example/faster-qat/cpu:dev, "
                 "train: registry.example/faster-qat/train:dev}")
    assert locked.returncode == 0 and locked.stderr == "", locked.stderr
    docs = list(yaml.safe_load_all((tmp_path / "out" / "qwen3-8b-b200.yaml").read_text()))
    images = {c["image"] for d in docs if d["kind"] == "Job"
              for c in d["spec"]["template"]["spec"]["initContainers"] + d["spec"]["template"]["spec"]["containers"]}
    assert images == set(digests.values())


def test_render_names_each_hub_id_no_revision_pins_and_where_it_is_read(tmp_path):
    """The profile pins Qwen/Qwen3-8B (model and tokenizer) but not its dataset: one line says so.
    Unpinning the model adds it, with the first stages that read it."""
    pinned_model = cli(tmp_path, "-c", "qwen3-8b-b200")
    assert pinned_model.returncode == 0, pinned_model.stderr
    hub_lines = [line for line in pinned_model.stderr.splitlines() if line.startswith("warning: hub id")]
    assert hub_lines == [
        "warning: hub id(s) nvidia/OpenScience (read as preprocess.source) not pinned to a revision: set "
        "model_revision, data.source_revision, data.tokenizer_revision (see `python -m pipeline config`) to a "
        "commit hash"]
    unpinned = cli(tmp_path, "-c", "qwen3-8b-b200", "--set", "model_revision=null", *DATA_PINNED)
    hub_lines = [line for line in unpinned.stderr.splitlines() if line.startswith("warning: hub id")]
    assert hub_lines == [
        "warning: hub id(s) Qwen/Qwen3-8B (read as preprocess.tokenizer, eval-base.model, ptq-qat-nvfp4.model and "
        "4 more) not pinned to a revision: set model_revision, data.source_revision, data.tokenizer_revision (see "
        "`python -m pipeline config`) to a commit hash"]
    every = cli(tmp_path, "-c", "qwen3-8b-b200", *DATA_PINNED)
    assert not [line for line in every.stderr.splitlines() if line.startswith("warning: hub id")]


def test_render_is_pure_and_deterministic_without_mlflow_or_cluster(tmp_path):
    """No MLFLOW_TRACKING_URI, no server, no kubeconfig: render exits 0, writes -o DIR only, and
    the same config renders the same bytes twice (tracking: the in-cluster default URI)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "KUBECONFIG")}
    env["KUBECONFIG"] = str(tmp_path / "no-such-kubeconfig")
    outputs = []
    for attempt in ("first", "second"):
        result = subprocess.run([sys.executable, "-m", "pipeline", "render", "--cluster", "k8s", "-c", "smoke",
                                 "--root", str(tmp_path / "runs"), "-o", str(tmp_path / attempt),
                                 "--set", f"k8s.host_mounts=[{REPO}/fixtures]"],
                                capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
        assert result.returncode == 0, result.stderr
        outputs.append((tmp_path / attempt / "smoke.yaml").read_bytes())
    assert outputs[0] == outputs[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "second"]  # no runs/, no mlflow.db
    spec = json.loads(next(d for d in yaml.safe_load_all(outputs[0]) if d["kind"] == "ConfigMap")
                      ["data"]["train-bf16.json"])
    assert spec["tracking"]["tracking_uri"] == "http://mlflow.faster-qat.svc.cluster.local:5000"
    assert spec["tracking"]["run_key"] == "smoke" and "parent_run_id" not in spec["tracking"]
    assert spec["params"]["recipe"]["name"] == "bf16"  # the recipe by value: a pod needs no file
