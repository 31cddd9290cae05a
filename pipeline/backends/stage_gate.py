"""The upstream gate and the stage runner, as shell scripts: how a job orders itself through
markers when its scheduler cannot order it (a k8s init container, a NeMo-Run task on an executor
without dependencies). Plain POSIX sh (plus `python -m stages.mark_failed`), so they run in
every stage image, under bash, and in the test harness alike.

- `gate_script`: puts the stage's spec in place (moving a stage dir of another fingerprint
  aside), then waits for every upstream's `_SUCCESS` of the current fingerprint; on an upstream's
  `_FAILED` it writes its own `_FAILED` and exits UPSTREAM_FAILED_EXIT, so the failure walks
  down the DAG one gate at a time.
- `run_script`: runs the stage command with its output in `stage.log` (and on stdout), forwards
  SIGTERM so the stage can checkpoint, and leaves `_FAILED` when the stage died without a marker.

Why a per-submission `attempt` token: a resubmitted run may still hold an upstream's `_FAILED`
from the last attempt. Each stage's gate (node 0) removes its own stale `_FAILED` and only then
writes `_ATTEMPT`; a dependent trusts an upstream's `_FAILED` only once that upstream's
`_ATTEMPT` is the current token, so an old failure never stops a new attempt.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from contract.markers import UPSTREAM_FAILED_EXIT
from pipeline.backends.job_shell import place_spec

ATTEMPT_ENV = "FASTER_QAT_ATTEMPT"


@dataclass(frozen=True)
class Upstream:
    name: str
    stage_dir: str
    fingerprint: str


def gate_script(stage: str, stage_dir: str, fingerprint: str, upstreams: list[Upstream], poll_seconds: int,
                write_spec: str, unique: str, node_index_var: str = "JOB_COMPLETION_INDEX",
                python: str = "python") -> str:
    """`write_spec` writes the spec to "$TMP_SPEC" (a cp, a heredoc); `unique` tells concurrent
    attempts apart ("$HOSTNAME", "$$"); `node_index_var` names the variable holding this node's
    index in a multi-node stage (unset: node 0)."""
    q = shlex.quote
    lines = [
        "set -eu",
        *place_spec(stage_dir, fingerprint, write_spec, unique),
        f'if [ "${{{node_index_var}:-0}}" = 0 ]; then',
        '  rm -f "$D/_FAILED"',
        f'  printf "%s\\n" "${ATTEMPT_ENV}" > "$D/.attempt.{unique}" && mv -f "$D/.attempt.{unique}" "$D/_ATTEMPT"',
        "fi",
        "wait_for() {",
        "  while :; do",
        '    if grep -qs "\\"fingerprint\\":\\"$3\\"" "$2/_SUCCESS"; then echo "upstream $1 succeeded"; return 0; fi',
        '    if grep -qs "\\"fingerprint\\":\\"$3\\"" "$2/_FAILED" && '
        f'[ "$(cat "$2/_ATTEMPT" 2>/dev/null)" = "${ATTEMPT_ENV}" ]; then',
        f'      echo "upstream $1 failed: {stage} will not run" >&2',
        f'      {python} -m stages.mark_failed --spec "$D/spec.json" --exit-code {UPSTREAM_FAILED_EXIT} '
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


def run_script(stage_dir: str, command: str, node_index_var: str = "JOB_COMPLETION_INDEX",
               python: str = "python", message_file: str | None = None) -> str:
    """Run the command with its output in stage.log (node i > 0: stage.<i>.log) and on stdout;
    forward SIGTERM so the stage can checkpoint; leave `_FAILED` when it died without a marker.
    `message_file`: where the failure's one line goes too (k8s: the termination message)."""
    q = shlex.quote
    message = f" --message-file {q(message_file)}" if message_file else ""
    return "\n".join([
        "set -u",
        f"D={q(stage_dir)}",
        'LOG="$D/stage.log"',
        f'if [ "${{{node_index_var}:-0}}" != 0 ]; then LOG="$D/stage.${node_index_var}.log"; fi',
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
        f'if [ "$RC" != 0 ]; then {python} -m stages.mark_failed --spec "$D/spec.json" --exit-code "$RC"{message}; fi',
        'exit "$RC"',
    ]) + "\n"
