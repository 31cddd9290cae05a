"""Shell lines that rendered jobs (Slurm scripts, k8s pods) run before their stage, so the
rendered files alone run a stage correctly: the stage dir of another fingerprint is moved aside
(its checkpoints must not be resumed by a changed stage), then the spec is put in place atomically.
Plain POSIX sh: it runs in every stage image."""

from __future__ import annotations

import shlex
from pathlib import PurePosixPath


def place_spec(stage_dir: str, fingerprint: str, write_tmp: str, unique: str) -> list[str]:
    """`write_tmp` writes the spec to "$TMP_SPEC" (a cp, or a heredoc); `unique` tells apart
    concurrent attempts (a job id, "$HOSTNAME")."""
    q = shlex.quote
    stage = PurePosixPath(stage_dir)
    trash = stage.parent / ".trash"
    return [
        f"D={q(str(stage))}",
        f'if [ -f "$D/spec.json" ] && ! grep -qs \'"fingerprint": "{fingerprint}"\' "$D/spec.json"; then',
        # Several pods of one stage may race here: the first moves it, the others find it gone.
        f'  mkdir -p {q(str(trash))} && mv "$D" {q(str(trash))}/{q(stage.name)}-"{unique}" 2>/dev/null || true',
        "fi",
        'mkdir -p "$D"',
        f'TMP_SPEC="$D/.spec.json.{unique}"',
        write_tmp,
        'mv -f "$TMP_SPEC" "$D/spec.json"',
    ]
