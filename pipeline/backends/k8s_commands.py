"""The shell scripts a stage pod runs: the init container waits for upstream markers, the main
container runs the stage command. Plain POSIX sh (plus `python -m stages.mark_failed`), so they
run in every stage image and in the test harness alike.

Why a per-submission `attempt` token: a resubmitted run may still hold an upstream's `_FAILED`
from the last attempt. Each stage's waiter (index 0) removes its own stale `_FAILED` and only then
writes `_ATTEMPT`; a dependent trusts an upstream's `_FAILED` only once that upstream's
`_ATTEMPT` is the current token, so an old failure never stops a new attempt.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from contract.launch import Rendezvous, StageLaunch
from contract.markers import UPSTREAM_FAILED_EXIT
from pipeline.backends.job_shell import place_spec

ATTEMPT_ENV = "FASTER_QAT_ATTEMPT"
SPECS_MOUNT = "/etc/faster-qat/specs"


@dataclass(frozen=True)
class Upstream:
    name: str
    stage_dir: str
    fingerprint: str


def spec_key(stage: str) -> str:
    return f"{stage}.json"


def wait_script(stage: str, stage_dir: str, fingerprint: str, upstreams: list[Upstream], poll_seconds: int) -> str:
    q = shlex.quote
    lines = [
        "set -eu",
        *place_spec(stage_dir, fingerprint, f'cp {q(SPECS_MOUNT + "/" + spec_key(stage))} "$TMP_SPEC"', "$HOSTNAME"),
        'if [ "${JOB_COMPLETION_INDEX:-0}" = 0 ]; then',
        '  rm -f "$D/_FAILED"',
        f'  printf "%s\\n" "${ATTEMPT_ENV}" > "$D/.attempt.$HOSTNAME" && mv -f "$D/.attempt.$HOSTNAME" "$D/_ATTEMPT"',
        "fi",
        "wait_for() {",
        "  while :; do",
        '    if grep -qs "\\"fingerprint\\":\\"$3\\"" "$2/_SUCCESS"; then echo "upstream $1 succeeded"; return 0; fi',
        '    if grep -qs "\\"fingerprint\\":\\"$3\\"" "$2/_FAILED" && '
        f'[ "$(cat "$2/_ATTEMPT" 2>/dev/null)" = "${ATTEMPT_ENV}" ]; then',
        f'      echo "upstream $1 failed: {stage} will not run" >&2',
        f'      python -m stages.mark_failed --spec "$D/spec.json" --exit-code {UPSTREAM_FAILED_EXIT} '
        f'--error "{stage}: upstream \'$1\' failed"',
        f"      exit {UPSTREAM_FAILED_EXIT}",
        "    fi",
        f"    sleep {poll_seconds}",
        "  done",
        "}",
    ]
    for upstream in upstreams:
        lines.append(f"wait_for {q(upstream.name)} {q(upstream.stage_dir)} {q(upstream.fingerprint)}")
    return "\n".join(lines) + "\n"


def stage_command(kind: str, spec_path: str, nodes: int, processes_per_node: int, master_port: int) -> str:
    """The contract's launch command for one pod (a node of a multi-node stage: static ranks
    from the Indexed Job's completion index, node 0 as the rendezvous)."""
    launch = StageLaunch(kind, spec_path, nodes=nodes, processes_per_node=processes_per_node)
    return launch.shell(Rendezvous(endpoint=f"$MASTER_ADDR:{master_port}", node_rank="$JOB_COMPLETION_INDEX"))


def main_script(stage_dir: str, command: str) -> str:
    """Run the command with its output in stage.log (and the pod log); forward SIGTERM so the
    stage can checkpoint; leave `_FAILED` when it died without a marker."""
    q = shlex.quote
    return "\n".join([
        "set -u",
        f"D={q(stage_dir)}",
        'LOG="$D/stage.log"',
        'if [ "${JOB_COMPLETION_INDEX:-0}" != 0 ]; then LOG="$D/stage.$JOB_COMPLETION_INDEX.log"; fi',
        'touch "$LOG"',
        'START=$(( $(wc -c < "$LOG") + 1 ))',
        f'echo "=== $(date "+%F %T") $HOSTNAME:" {q(command)} >> "$LOG"',
        f"{command} >> \"$LOG\" 2>&1 &",
        "PID=$!",
        'tail -c +"$START" -f "$LOG" &',
        "TAIL=$!",
        "trap 'kill -TERM $PID 2>/dev/null' TERM INT",
        "while :; do wait $PID; RC=$?; kill -0 $PID 2>/dev/null || break; done",
        "sleep 1; kill $TAIL 2>/dev/null",
        'if [ "$RC" != 0 ]; then python -m stages.mark_failed --spec "$D/spec.json" --exit-code "$RC" '
        '--message-file /dev/termination-log; fi',
        'exit "$RC"',
    ]) + "\n"
