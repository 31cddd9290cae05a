"""`render --cluster nemo-run`: the experiment as files, pure and deterministic; bad settings are
one line and exit 2 before anything is written. (Running the files: test_nemo_local/_slurm.)"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from pipeline.backends.nemo_settings import NemoRunSettings
from tests.smoke import pipeline_cli

REPO = Path(__file__).resolve().parents[3]
SLURM = ["--set", "nemo_run.executor=slurm", "--set", "nemo_run.slurm.account=studies",
         "--set", "nemo_run.slurm.partition=debug"]


def render(tmp_path: Path, out: str, *settings: str) -> subprocess.CompletedProcess:
    return pipeline_cli("render", "--cluster", "nemo-run", "-c", "smoke", "--root", str(tmp_path / "runs"),
                        "-o", str(tmp_path / out), *settings)


def test_render_writes_the_experiment_and_a_script_per_stage_the_same_bytes_every_time(tmp_path):
    first, second = render(tmp_path, "a", *SLURM), render(tmp_path, "b", *SLURM)
    assert first.returncode == 0 and second.returncode == 0, first.stderr
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert len(names) == 28 + 2 and "experiment.py" in names and "run.json" in names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert not (tmp_path / "runs").exists()  # pure: nothing under the artifact root


def test_on_slurm_the_executor_orders_the_tasks_and_scripts_only_place_their_spec(tmp_path):
    assert render(tmp_path, "out", *SLURM).returncode == 0
    experiment = (tmp_path / "out" / "experiment.py").read_text()
    ast.parse(experiment)
    assert ("    exp.add(stage('export-bf16', attempt), executor=slurm(nodes=1, gpus_per_node=0, cpus=1, "
            "memory=4096, time_limit='01:00:00'), name='export-bf16', dependencies=['preprocess', 'train-bf16'])") in experiment
    assert "    exp.add(stage('preprocess', attempt), executor=slurm(nodes=1, gpus_per_node=0, cpus=1, " \
           "memory=2048, time_limit='01:00:00'), name='preprocess')" in experiment
    assert "account='studies'," in experiment and "partition='debug'," in experiment
    assert "exp.run(detach=True)" in experiment and "packager=run.Packager()" in experiment
    script = (tmp_path / "out" / "export-bf16.sh").read_text()
    assert "wait_for " not in script.replace("wait_for() {", "")  # Slurm's afterok orders it
    assert '"stage": "export-bf16"' in script and "-m stages.export --spec" in script


def test_on_the_local_executor_each_task_waits_at_the_gate_for_its_upstreams(tmp_path):
    assert render(tmp_path, "out", "--set", f"nemo_run.python={sys.executable}").returncode == 0
    experiment = (tmp_path / "out" / "experiment.py").read_text()
    assert "dependencies=" not in experiment  # NeMo-Run's LocalExecutor ignores them
    assert "exp.add(stage('report', attempt), executor=local(), name='report')" in experiment
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    for name, stage in record["stages"].items():
        script = (tmp_path / "out" / f"{name}.sh").read_text()
        waits = [line.split()[1] for line in script.splitlines() if line.startswith("wait_for ")]
        assert waits == sorted(set(stage["upstream"].values())), name
    assert len(waits) == 17  # the report waits for every eval and train stage
    assert f"      {sys.executable} -m stages.mark_failed --spec \"$D/spec.json\" --exit-code 42" in script
    assert f"cd {REPO}" in script


def test_bad_nemo_run_settings_are_one_line_and_exit_2(tmp_path):
    cases = {
        ("--set", "nemo_run.executor=kubeflow"): "nemo_run.executor: Input should be 'local' or 'slurm'",
        ("--set", "nemo_run.executor=slurm"): "nemo_run: executor slurm needs a `slurm:` section",
        (*SLURM, "--set", "nemo_run.slurm.account=5"): "nemo_run.slurm.account: Input should be a valid string",
        (*SLURM, "--set", "nemo_run.slurm.exclusive=maybe"): "nemo_run.slurm.exclusive: Input should be a valid boolean",
        ("--set", "nemo_run.poll_seconds=often"): "nemo_run.poll_seconds: Input should be a valid integer",
        ("--set", "nemo_run.local.cpus=2"): "nemo_run.local.cpus: unknown key",
    }
    for settings, expected in cases.items():
        for command in ("render", "submit"):
            args = [command, "--cluster", "nemo-run", "-c", "smoke", "--root", str(tmp_path / "runs"), *settings]
            result = pipeline_cli(*args, *(["-o", str(tmp_path / "out")] if command == "render" else []))
            assert result.returncode == 2, (settings, result.stderr)
            assert len(result.stderr.splitlines()) == 1 and expected in result.stderr, (settings, result.stderr)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_a_path_nemo_run_would_rewrite_is_refused(tmp_path):
    result = render(tmp_path, "out", *SLURM, "--set", "nemo_run.workdir=/opt/nemo_run/faster-qat")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("holds '/nemo_run', which NeMo-Run's Slurm executor rewrites in "
                                          "scripts; move the artifact root, workdir or python")


def test_without_the_extra_submit_is_one_line_exit_2_and_writes_nothing(tmp_path):
    # sys.modules[name] = None is Python's own "this module cannot be imported".
    code = ("import sys; sys.modules['nemo_run'] = None; from pipeline.cli import main; "
            f"sys.exit(main(['submit', '--cluster', 'nemo-run', '-c', 'smoke', '--root', {str(tmp_path / 'runs')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "error: nemo-run: the optional extra is not installed: pip install -e '.[nemo]'\n"
    assert not (tmp_path / "runs").exists()


def test_the_control_plane_imports_without_the_extra():
    code = ("import sys; sys.modules['nemo_run'] = None; import pipeline.cli, pipeline.backends.nemo; "
            "print(sorted(m for m in sys.modules if m.startswith(('nemo_run', 'torchx', 'ray', 'leptonai'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['nemo_run']"  # only our None: nothing of the extra was loaded


def test_settings_default_to_the_local_executor():
    settings = NemoRunSettings()
    assert (settings.executor, settings.has_dependencies, settings.poll_seconds) == ("local", False, 5)
