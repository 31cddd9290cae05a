"""Start-up cost of the stages, on the smoke study: where a first run's time goes.

    python -m bench.startup [--root DIR | --from-run RUN_DIR] [--stages a,b] [--json FILE]

1. The smoke study's first run, as the README runs it (`python -m pipeline run -c smoke`; with
   `--runtime fresh-process` every stage a fresh process, by default the CPU stages forked from
   the preloaded launcher): its wall and CPU time, and per stage kind the median time from the stage's launch (the driver's
   record in jobs.json) to its first line of work, and to its end.
2. One stage of each kind again, alone, in a fresh process (`python -m stages.<kind> --spec`,
   the contract's command: what Slurm, k8s and the plain local launcher run), from a copy of
   its spec with a fresh output dir: launch -> first line of work -> end, with no other stage
   beside it; then the same under `-X importtime`, whose table gives the import time of the
   heavy packages the stage loads (at the top and lazily during its work: the sum of the self
   times of all of a package's modules).
3. Per kind, what the stage imports before its first line of work (`stages.<kind>.core` and
   the runtime), under `-X importtime`.

"First line of work" is the moment the stage writes its first tracking event
(`tracking/events.jsonl`, made by the runtime right before it calls the stage's work, after
imports, reading the spec and checking markers), seen by polling every 5 ms. The load average
(1, 5, 15 min) is recorded before and after each part: the host is shared, so a number taken
under load says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVENTS = Path("tracking") / "events.jsonl"
# One stage per kind, plus the ones whose recipe pulls in a package the others do not.
DEFAULT_STAGES = ("preprocess", "train-bf16", "train-int8-int4", "ptq-qat-nvfp4", "export-bf16",
                  "export-qat-nvfp4", "eval-base", "eval-qat-nvfp4", "eval-int8-int4", "report")
HEAVY_PACKAGES = ("torch", "transformers", "datasets", "pandas", "pyarrow", "mlflow", "sqlalchemy", "lm_eval", "torchao",
                  "modelopt", "triton", "matplotlib", "scipy", "sympy")


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


@dataclass
class StageTimes:
    stage: str
    kind: str
    to_work_s: float | None  # launch -> first tracking event
    total_s: float | None  # launch -> end
    cpu_s: float | None = None  # CPU time (user + system) of the stage's processes: less sensitive to load
    imports_s: dict[str, float] = field(default_factory=dict)  # package -> s importing its modules
    import_total_s: float | None = None
    load_before: str = ""
    load_after: str = ""


class FirstWorkWatcher:
    """Notes when the first tracking event of each stage dir under `parent` appears (polling:
    no hook in the stage, so the same measure holds for any version of the code)."""

    def __init__(self, parent: Path, poll_s: float = 0.005):
        self.seen: dict[str, float] = {}
        self._parent = parent
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> FirstWorkWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                names = os.listdir(self._parent)
            except FileNotFoundError:
                names = []
            for name in names:
                if name not in self.seen and (self._parent / name / EVENTS).exists():
                    self.seen[name] = time.time()
            time.sleep(self._poll_s)


def run_study(root: Path, runtime: str) -> tuple[float, float, list[StageTimes], str, str]:
    """The README's first run: wall and CPU time (the driver and every stage); per stage:
    launch -> first work -> end (driver's clock)."""
    run_dir = root / "smoke"
    load_before = load_average()
    with FirstWorkWatcher(run_dir) as watcher:
        cpu_before = _children_cpu()
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "pipeline", "run", "-c", "smoke", "--root", str(root),
                                 "--plain", "--runtime", runtime], cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - started
        cpu = _children_cpu() - cpu_before
    load_after = load_average()
    if result.returncode != 0:
        sys.exit(f"the smoke study failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    jobs = json.loads((run_dir / "jobs.json").read_text())["stages"]
    kinds = {name: stage["kind"] for name, stage in json.loads((run_dir / "run.json").read_text())["stages"].items()}
    times = []
    for name, job in jobs.items():
        first = watcher.seen.get(name)
        times.append(StageTimes(name, kinds[name], first - job["started_at"] if first else None,
                                job["finished_at"] - job["started_at"]))
    return wall, cpu, times, load_before, load_after


def isolated_spec(run_dir: Path, stage: str, tag: str) -> Path:
    """A copy of the stage's spec writing to a fresh dir beside the stage's own: the stage runs
    again, from scratch, and finds the other stages where it looks for them (the report sends
    metrics to their MLflow runs)."""
    spec = json.loads((run_dir / stage / "spec.json").read_text())
    out = run_dir / f"bench-{stage}.{tag}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec["output_dir"] = str(out)
    path = out / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def fresh_process(spec_path: Path, kind: str, importtime: bool) -> tuple[float | None, float, float, str]:
    """`python -m stages.<kind> --spec` alone: (to first work, to end, CPU time, stderr)."""
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", f"stages.{kind}",
               "--spec", str(spec_path)]
    out = spec_path.parent
    with FirstWorkWatcher(out.parent) as watcher:
        cpu_before = _children_cpu()
        started = time.time()
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""})
        ended = time.time()
        cpu = _children_cpu() - cpu_before
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    first = watcher.seen.get(out.name)
    return (first - started if first else None), ended - started, cpu, result.stderr


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


_IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)$")


def import_table(stderr: str) -> tuple[dict[str, float], float]:
    """Import time (s) of each heavy package: the self times of all its modules, wherever they
    were imported from (a package's top module alone may be tiny: `import lm_eval` is, its
    tasks are not); and the total of all imports."""
    per_package: dict[str, int] = {}
    total_us = 0
    for line in stderr.splitlines():
        match = _IMPORT_LINE.match(line)
        if not match:
            continue
        self_us, _, _, module = match.groups()
        total_us += int(self_us)
        package = module.split(".", 1)[0]
        if package in HEAVY_PACKAGES:
            per_package[package] = per_package.get(package, 0) + int(self_us)
    return {package: us / 1e6 for package, us in per_package.items()}, total_us / 1e6


def isolated_runs(run_dir: Path, stages: list[str]) -> list[StageTimes]:
    kinds = {name: stage["kind"] for name, stage in json.loads((run_dir / "run.json").read_text())["stages"].items()}
    found = []
    for stage in stages:
        kind = kinds[stage]
        load_before = load_average()
        to_work, total, cpu, _ = fresh_process(isolated_spec(run_dir, stage, "fresh"), kind, importtime=False)
        load_after = load_average()
        _, _, _, stderr = fresh_process(isolated_spec(run_dir, stage, "importtime"), kind, importtime=True)
        imports, import_total = import_table(stderr)
        found.append(StageTimes(stage, kind, to_work, total, cpu, imports, import_total, load_before, load_after))
        print(f"  {stage}: to work {_s(to_work)}, total {_s(total)}, cpu {_s(cpu)}, imports {_s(import_total)} "
              f"(load {load_before} -> {load_after})", flush=True)
    return found


def by_kind(times: list[StageTimes]) -> dict[str, dict[str, float | int | None]]:
    kinds: dict[str, list[StageTimes]] = {}
    for entry in times:
        kinds.setdefault(entry.kind, []).append(entry)
    table = {}
    for kind, entries in kinds.items():
        to_work = [e.to_work_s for e in entries if e.to_work_s is not None]
        table[kind] = {"stages": len(entries),
                       "to_work_median_s": statistics.median(to_work) if to_work else None,
                       "total_median_s": statistics.median(e.total_s for e in entries if e.total_s is not None),
                       "to_work_sum_s": sum(to_work), "total_sum_s": sum(e.total_s or 0 for e in entries)}
    return table


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_study(wall: float, cpu: float, study: list[StageTimes], load: tuple[str, str]) -> None:
    print(f"\nsmoke study, first run: {wall:.1f} s, CPU {cpu:.1f} s (load average {load[0]} -> {load[1]})")
    print("\n| kind | stages | launch -> work, median s | launch -> end, median s | sum to work s | sum total s |")
    print("|---|---|---|---|---|---|")
    for kind, row in by_kind(study).items():
        print(f"| {kind} | {row['stages']} | {_s(row['to_work_median_s'])} | {_s(row['total_median_s'])} "
              f"| {_s(row['to_work_sum_s'])} | {_s(row['total_sum_s'])} |")


def print_isolated(isolated: list[StageTimes]) -> None:
    if not isolated:
        return
    shown = [name for name in HEAVY_PACKAGES if any(name in e.imports_s for e in isolated)]
    print("\nalone, fresh process (`python -m stages.<kind> --spec`); import columns: s spent importing "
          "each package's modules under -X importtime")
    print("| stage | kind | launch -> work s | launch -> end s | CPU s | all imports s | " + " | ".join(shown)
          + " | load |")
    print("|---" * (7 + len(shown)) + "|")
    for e in isolated:
        columns = " | ".join(_s(e.imports_s.get(name)) for name in shown)
        print(f"| {e.stage} | {e.kind} | {_s(e.to_work_s)} | {_s(e.total_s)} | {_s(e.cpu_s)} | {_s(e.import_total_s)} | {columns} "
              f"| {e.load_before} -> {e.load_after} |")


def top_imports(kinds: list[str]) -> dict[str, dict[str, float]]:
    """Per kind, what `python -m stages.<kind>` imports before its first line of work (its
    `core` and the runtime): s per heavy package and `all` (one fresh process each)."""
    found = {}
    for kind in kinds:
        result = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import stages.runtime, stages.{kind}.core"],
                                cwd=REPO, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        if result.returncode != 0:
            sys.exit(f"importing stages.{kind}.core failed:\n{result.stderr[-3000:]}")
        packages, total = import_table(result.stderr)
        found[kind] = {"all": total, **packages}
    return found


def print_top_imports(table: dict[str, dict[str, float]]) -> None:
    shown = [name for name in HEAVY_PACKAGES if any(name in row for row in table.values())]
    print("\nimported at the top (before the first line of work), s under -X importtime")
    print("| kind | all imports | " + " | ".join(shown) + " |")
    print("|---" * (2 + len(shown)) + "|")
    for kind, row in table.items():
        print(f"| {kind} | {_s(row['all'])} | " + " | ".join(_s(row.get(name)) for name in shown) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="artifact root (default: a new temp dir)")
    parser.add_argument("--from-run", type=Path, default=None,
                        help="skip the first run: take the stages of this finished smoke run dir")
    parser.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                        help="stages to run again alone ('' for none)")
    parser.add_argument("--runtime", default="process", choices=("process", "fresh-process"),
                        help="how the study's stages start (the local backend's --runtime)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    wall, cpu, study, load = None, None, [], ("", "")
    if args.from_run:
        run_dir = args.from_run.resolve()
    else:
        root = (args.root or Path(tempfile.mkdtemp(prefix="bench-startup-"))).resolve()
        if (root / "smoke").exists():
            sys.exit(f"{root}/smoke exists: the bench measures a first run; give an empty --root")
        print(f"smoke study under {root}, --runtime {args.runtime} (load average {load_average()})", flush=True)
        wall, cpu, study, *load = run_study(root, args.runtime)
        run_dir = root / "smoke"
    stages = [name for name in args.stages.split(",") if name]
    isolated = isolated_runs(run_dir, stages) if stages else []
    kinds = sorted({e.kind for e in isolated} | {e.kind for e in study})
    top = top_imports(kinds)
    if wall is not None:
        print_study(wall, cpu, study, (load[0], load[1]))
    print_isolated(isolated)
    print_top_imports(top)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "study_runtime": args.runtime, "study_wall_s": wall, "study_cpu_s": cpu, "study_load": load, "study_by_kind": by_kind(study),
            "study_stages": [asdict(e) for e in study], "alone": [asdict(e) for e in isolated],
            "top_imports": top, "host_cpus": os.cpu_count(),
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
