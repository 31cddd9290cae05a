"""The preloaded launcher's child is a process its code cannot tell from a fresh one.

The same small program (tests/pipeline/launch_probe.py) is started the two ways the local
driver starts stages, with the same environment, and writes down what it sees of its process:
session and group, signals and mask, descriptors, environment, working directory, argv,
limits, parent-death signal, random state, torch's threads and generator. Then the ways it can
end (exit codes, an exception, a segfault, signals to its group) must read the same too.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from contract.device_sharing import LEDGER_ENV
from contract.markers import read_marker
from pipeline.backends.local_launch import (
    ForkServer,
    PreloadedProcesses,
    StageStart,
    start_fresh,
)
from pipeline.errors import BackendError
from tests.pipeline.probe_dag import fan_out_graph, prepare

REPO = Path(__file__).resolve().parents[2]
PROBE = "tests.pipeline.launch_probe"


def cpu_stage_env(tmp: Path) -> dict[str, str]:
    """What the local driver gives a CPU stage, but for its job id."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", LEDGER_ENV: str(tmp / "placements.jsonl")}
    env.pop("PIPELINE_JOB_ID", None)
    return env


class Launchers:
    """Starts the probe fresh or forked, in `tmp`, and reads back what it saw."""

    def __init__(self, tmp: Path, kinds: list[str], tracking: str | None = None):
        self.tmp = tmp
        self.env = cpu_stage_env(tmp)
        self.server = ForkServer.start(sys.executable, kinds, tracking, tmp / "preload.log", self.env)
        self.count = 0

    def start(self, how: str, *args: str, then: str = "exit:0", env: dict[str, str] | None = None):
        self.count += 1
        out = self.tmp / f"{how}-{self.count}.json"
        log = (self.tmp / f"{how}-{self.count}.log").open("ab")
        stage_env = {**(env or self.env), "PIPELINE_JOB_ID": f"job-{self.count}"}
        module_args = ["--out", str(out), "--then", then, *args]
        if how == "fresh":
            process = start_fresh([sys.executable, "-m", PROBE, *module_args], stage_env, log)
        else:
            process = self.server.fork(PROBE, module_args, stage_env, log)
        log.close()
        return process, out

    def run(self, how: str, *args: str, then: str = "exit:0") -> tuple[int, dict, str]:
        process, out = self.start(how, *args, then=then)
        code = process.wait()
        seen = json.loads(out.read_text()) if out.exists() else {}
        return code, seen, out.with_suffix(".log").read_text()


@pytest.fixture(scope="module")
def launchers(tmp_path_factory) -> Launchers:
    tmp = tmp_path_factory.mktemp("launch")
    found = Launchers(tmp, ["probe"])
    yield found
    found.server.stop()


def comparable(seen: dict, log: Path) -> dict:
    """What must be equal between any two launches of the probe: pid-bound values are checked
    for their relation (own session and group), each launch's own file names are named alike,
    random draws are left out."""
    assert seen["pid"] == seen["pgid"] == seen["sid"]  # leads its own session and process group
    assert seen["fds"]["1"] == seen["fds"]["2"] == str(log)  # stdout and stderr: the stage's log
    assert seen["fds"]["0"] == "/dev/null"
    own = str(log.with_suffix(".json"))
    env = {name: value for name, value in seen["env"].items() if name != "PIPELINE_JOB_ID"}
    dropped = ("pid", "pgid", "sid", "random", "numpy_random", "env", "fds")
    return {**{key: value for key, value in seen.items() if key not in dropped},
            "argv": [("OUT" if arg == own else arg) for arg in seen["argv"]],
            "orig_argv": [("OUT" if arg == own else arg) for arg in seen["orig_argv"]],
            "env": env, "fd_numbers": sorted(seen["fds"])}


def test_a_forked_child_sees_what_a_fresh_process_sees(launchers, tmp_path):
    fresh_code, fresh, _ = launchers.run("fresh")
    forked_code, forked, _ = launchers.run("forked")
    assert fresh_code == forked_code == 0
    assert comparable(fresh, launchers.tmp / "fresh-1.log") == comparable(forked, launchers.tmp / "forked-2.log")
    assert forked["fds"].keys() == {"0", "1", "2"}  # nothing of the server's is left open
    assert forked["pdeathsig"] == signal.SIGTERM
    assert forked["cwd"] == forked["path0"] == os.getcwd()
    assert forked["argv"] == [str(REPO / "tests" / "pipeline" / "launch_probe.py"), "--out",
                              str(launchers.tmp / "forked-2.json"), "--then", "exit:0"]
    assert forked["env"]["CUDA_VISIBLE_DEVICES"] == "" and forked["env"][LEDGER_ENV] == launchers.env[LEDGER_ENV]
    assert forked["env"]["PIPELINE_JOB_ID"] == "job-2"
    assert forked["name"] == "__main__"


@pytest.mark.parametrize(("then", "code", "in_log"), [
    ("exit:0", 0, "launch_probe: wrote"),
    ("exit:3", 3, "launch_probe: wrote"),
    ("raise", 1, "RuntimeError: launch_probe asked to raise"),
    ("segfault", -signal.SIGSEGV, "launch_probe: wrote"),
    ("sigterm", -signal.SIGTERM, "launch_probe: wrote"),
])
def test_every_way_of_ending_reads_the_same(launchers, then, code, in_log):
    for how in ("fresh", "forked"):
        ended, _, log = launchers.run(how, then=then)
        assert (how, ended) == (how, code)
        assert in_log in log


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_signal_to_the_group_ends_both_alike(launchers, signum):
    codes = {}
    for how in ("fresh", "forked"):
        process, out = launchers.start(how, then="wait")
        deadline = time.time() + 30
        while not out.exists() and time.time() < deadline:  # its handlers are in place
            time.sleep(0.02)
        os.killpg(process.pid, signum)
        codes[how] = process.wait()
    # SIGINT: Python's KeyboardInterrupt, re-raised as the signal when it ends the interpreter
    assert codes == {"fresh": -signum, "forked": -signum}


def test_two_forked_children_draw_different_random_numbers(launchers):
    _, first, _ = launchers.run("forked", "--import", "numpy")
    _, second, _ = launchers.run("forked", "--import", "numpy")
    assert first["random"] != second["random"]
    assert first["numpy_random"] != second["numpy_random"]


def test_an_environment_other_than_the_servers_is_refused(launchers, tmp_path):
    other = {**launchers.env, "OMP_NUM_THREADS": "7"}
    with pytest.raises(BackendError, match="differs from the preloaded launcher's in OMP_NUM_THREADS"):
        launchers.start("forked", env=other)


def test_the_children_of_a_killed_server_do_not_outlive_it(tmp_path):
    found = Launchers(tmp_path, ["probe"])
    process, out = found.start("forked", then="wait")
    deadline = time.time() + 30
    while not out.exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(found.server.pid, signal.SIGKILL)
    found.server.process.wait()
    deadline = time.time() + 10
    while Path(f"/proc/{process.pid}").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{process.pid}").exists()  # its PDEATHSIG ended it; nobody is left
    assert process.wait() == -signal.SIGKILL  # what the driver records: the launcher took it down
    found.server.stop()


SMOKE_KINDS = ["preprocess", "eval", "ptq", "train", "export", "report"]  # in the order the smoke study runs them


def test_with_everything_the_smoke_study_preloads_the_child_has_torchs_fresh_state(tmp_path):
    found = Launchers(tmp_path, SMOKE_KINDS, tracking="sqlite:///unused.db")
    try:
        runs = [found.run("fresh", "--import", "torch"), found.run("forked", "--import", "torch"),
                found.run("forked", "--import", "torch")]
        _wait_for_warm(tmp_path / "preload.log")
        runs.append(found.run("forked", "--import", "torch"))  # forked from the fully preloaded server
    finally:
        found.server.stop()
    preloaded = (tmp_path / "preload.log").read_text()
    assert "preload: stages.ptq.core in" in preloaded and "preload: lm_eval.tasks in" in preloaded
    assert [line for line in preloaded.splitlines() if "Error" in line] == []  # no import failed
    (fresh_code, fresh, _), (forked_code, forked, _), (_, again, _), (warm_code, warm, _) = runs
    assert fresh_code == forked_code == warm_code == 0
    assert {key: forked["torch"][key] for key in ("threads", "cuda_initialized")} == \
        {key: fresh["torch"][key] for key in ("threads", "cuda_initialized")} == {"threads": os.cpu_count(),
                                                                                 "cuda_initialized": False}
    # torch seeds its default generator from entropy in every new process; so does each child
    assert len({run["torch"]["seed"] for run in (fresh, forked, again)}) == 3
    assert len({run["torch"]["first_draw"] for run in (fresh, forked, again)}) == 3
    for child, log in ((forked, "forked-2.log"), (warm, "forked-4.log")):
        assert comparable(fresh, tmp_path / "fresh-1.log") == {**comparable(child, tmp_path / log),
                                                               "torch": fresh["torch"]}
        assert child["fds"].keys() == {"0", "1", "2"}


def _wait_for_warm(log: Path, timeout: float = 300.0) -> None:
    """Until the server imported all it preloads (it says `warm` once it froze them)."""
    deadline = time.time() + timeout
    while "preload: warm" not in log.read_text():
        assert time.time() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)


def test_a_stage_the_launcher_refuses_starts_fresh_and_its_log_says_why(tmp_path):
    prepared = prepare(fan_out_graph(), tmp_path)
    env = cpu_stage_env(tmp_path)
    launcher = PreloadedProcesses()
    launcher.open(prepared.record, prepared.layout.run_dir, env)
    log_path = prepared.layout.log_path("source")
    try:
        with log_path.open("ab") as log:
            other = {**env, "OMP_NUM_THREADS": "7", "PIPELINE_JOB_ID": "job-1"}
            process = launcher.start(StageStart("source", prepared.record.stages["source"],
                                                prepared.layout.spec_path("source"), [], other, log))
        assert process.wait() == 0
    finally:
        launcher.close()
    log = log_path.read_text()
    assert ("warning: source: the preloaded launcher refused it (the stage's environment differs from the "
            "preloaded launcher's in OMP_NUM_THREADS") in log
    assert "forked by the preloaded launcher" not in log and "-m stages.probe --spec" in log
    assert read_marker(prepared.layout.stage_dir("source")).state == "succeeded"


def test_a_driver_holding_over_1024_files_still_hears_the_server(tmp_path):
    """select() refuses fd numbers past 1024; a long-lived driver (or test session) gets them."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    launchers = Launchers(tmp_path, ["probe"])  # its socket's fd number is past 1024
    try:
        assert launchers.server.sock.fileno() > 1024
        code, seen, _ = launchers.run("forked")
        assert code == 0 and seen
    finally:
        launchers.server.stop()
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
