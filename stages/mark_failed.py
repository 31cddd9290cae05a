"""`python -m stages.mark_failed --spec S --exit-code N [--error TEXT]`: leave a `_FAILED` marker
for a stage whose process ended without one (killed, OOM, upstream failed seen by a waiter).

Cluster backends run it after the stage command (`stage || python -m stages.mark_failed ...`) so
dependents waiting on markers learn of the failure at once. It never overwrites a marker of the
same fingerprint (the stage's own verdict wins) and writes nothing for an interrupted stage
(exit 130/143: the next attempt resumes it). Torch-free: it runs in any stage image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from contract.markers import mark_failed, read_marker
from contract.spec import load_spec

INTERRUPTED_EXITS = (130, 143)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, type=Path, help="the stage's spec.json")
    parser.add_argument("--exit-code", required=True, type=int, help="exit code of the stage")
    parser.add_argument("--error", default="", help="one-line reason (default: names the exit code)")
    parser.add_argument("--message-file", type=Path, default=None,
                        help="also write the failure's one line here (k8s: /dev/termination-log, which "
                        "the API shows as the container's termination message)")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
    except Exception as error:
        print(f"error: {args.spec}: invalid stage spec: {error}".splitlines()[0], file=sys.stderr)
        return 2
    if args.exit_code in INTERRUPTED_EXITS:
        return 0
    marker = read_marker(spec.output_dir)
    if marker is None or marker.fingerprint != spec.fingerprint:
        error = args.error or (f"{spec.stage}: exited with code {args.exit_code} without a marker "
                               "(killed or out of memory?); see its log")
        mark_failed(spec.output_dir, spec.fingerprint, error, args.exit_code)
        marker = read_marker(spec.output_dir)
    if args.message_file is not None and marker is not None and marker.error:
        try:
            args.message_file.write_text(marker.error[:4000])  # the API keeps 4 KiB of it
        except OSError:
            pass  # no termination log where this runs: the marker says it all
    return 0


if __name__ == "__main__":
    sys.exit(main())
