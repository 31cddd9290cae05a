"""`python -m pipeline ...`: validate, run, submit, render, status, logs, cancel, report, sync, config.

Bad input of any kind ends in one line on stderr and exit code 2, before anything starts.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from contract.spec import is_dns1123_label
from pipeline.backends import CLUSTERS, backend_for, renderable_clusters
from pipeline.backends.base import Backend
from pipeline.backends.local_settings import LocalSettings
from pipeline.errors import BackendError, ConfigError, one_line
from pipeline.layout import RunLayout, list_runs
from pipeline.run_record import RunRecord, read_record

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        print(f"error: {self.prog}: {one_line(message)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True,
                        help="profile name (smoke, h100, qwen3-8b-b200) or a YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K.PATH=V",
                        help="override a config value, e.g. --set runs.fp8.train.lr=2e-5")


def _root_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, default=Path("runs"),
                        help="artifact root (default ./runs)")


def _runtime_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runtime", choices=("process", "fresh-process", "docker"), default=None,
                        help="local: stages as processes here (default: CPU stages forked from a launcher "
                             "that preloaded their code; fresh-process: each a new python process) or in "
                             "their images (pinned by digest) through Docker")


def _images_commands(commands: argparse._SubParsersAction) -> None:
    images = commands.add_parser("images", help="build, push and lock the stage images (Docker)")
    actions = images.add_subparsers(dest="images_command", required=True, parser_class=_Parser)
    for name, text in (("build", "build images/<name>/Dockerfile, streaming the build log"),
                       ("push", "push the built images to their repositories"),
                       ("lock", "pin the local images by digest in the lock file")):
        action = actions.add_parser(name, help=text)
        action.add_argument("names", nargs="*", metavar="NAME", help="images (default: all)")
        action.add_argument("-c", "--config", default=None,
                            help="profile or YAML whose images.refs name the repositories "
                                 "(default: the built-in refs)")
        action.add_argument("--set", dest="overrides", action="append", default=[], metavar="K.PATH=V")
        if name == "build":
            action.add_argument("--base", help="base image instead of the Dockerfile's pinned BASE "
                                               "(e.g. a local image for offline builds)")
            action.add_argument("--build-arg", action="append", default=[], metavar="K=V",
                                help="e.g. INSTALL_DEPS=0 on a base that already has the packages")
            action.add_argument("--network", default=None, help="network of the RUN steps (none, host)")
            action.add_argument("--no-cache", action="store_true")
        if name == "lock":
            action.add_argument("--lock-file", type=Path, default=None,
                                help="default: the config's images.lock_file")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    validate = commands.add_parser("validate", help="check a config and print its DAG")
    _config_args(validate)

    run = commands.add_parser("run", help="run the study here, showing live stage states")
    _config_args(run)
    _root_arg(run)
    run.add_argument("--run-id", help="run id (default: the study name)")
    run.add_argument("--max-parallel", type=_positive_int, default=None,
                     help="stages at once (default: cores, at most 4)")
    run.add_argument("--plain", action="store_true", help="plain lines instead of a live table")
    _runtime_arg(run)

    submit = commands.add_parser("submit", help="hand the whole DAG to a cluster and return")
    submit.add_argument("--cluster", required=True, choices=sorted(CLUSTERS))
    _config_args(submit)
    _root_arg(submit)
    submit.add_argument("--run-id", help="run id (default: the study name)")
    submit.add_argument("--max-parallel", type=_positive_int, default=None, help="local: stages at once")
    submit.add_argument("--watch", action="store_true",
                        help="after submitting, show the live stage table until the run ends")
    _runtime_arg(submit)

    clusters = renderable_clusters()
    if clusters:
        render = commands.add_parser("render", help="write the cluster jobs to files, submit nothing")
        render.add_argument("--cluster", required=True, choices=clusters)
        _config_args(render)
        _root_arg(render)
        render.add_argument("--run-id", help="run id (default: the study name)")
        render.add_argument("-o", "--output", type=Path, required=True, help="folder for the files")

    for name, text in (("status", "stage states of a run"), ("cancel", "stop a run"),
                       ("report", "print the study table of a run"),
                       ("sync", "send tracking events buffered during an MLflow outage"),
                       ("verify", "hash the outputs of every succeeded stage against its _SUCCESS")):
        command = commands.add_parser(name, help=text)
        command.add_argument("run_id", nargs="?", help="run id (default: the latest run)")
        _root_arg(command)
    logs = commands.add_parser("logs", help="print a stage's log")
    logs.add_argument("run_id", help="run id")
    logs.add_argument("stage", help="stage name")
    logs.add_argument("--tail", type=_count, default=0, help="only the last N lines (0: all)")
    _root_arg(logs)

    _images_commands(commands)

    config = commands.add_parser("config", help="describe every config field, or show a resolved config")
    config.add_argument("-c", "--config", help="show this profile/YAML resolved (with --set)")
    config.add_argument("--set", dest="overrides", action="append", default=[], metavar="K.PATH=V")
    return parser


@functools.lru_cache(maxsize=1)
def _parser() -> argparse.ArgumentParser:
    return build_parser()  # ~10 ms to build: once per process (tests call main many times)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = _HANDLERS[args.command]
    try:
        return handler(args)
    except (ConfigError, BackendError, FileNotFoundError) as error:
        print(f"error: {one_line(str(error))}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, ConfigError) else EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be 0 (all) or more")
    return value


def _run_id(args: argparse.Namespace, default: str) -> str:
    """`--run-id`, or the study name: a folder under the root and part of k8s Job names."""
    run_id = args.run_id or default
    if not is_dns1123_label(run_id):
        raise ConfigError(f"--run-id {run_id}: must be a DNS-1123 label (lowercase letters, digits "
                          "and '-', at most 63 characters)")
    return run_id


def _load(args: argparse.Namespace):
    """The config, validated, with its local data source checked (columns in the first rows)."""
    from pipeline.data_check import check_data_source
    from pipeline.loader import load_config

    loaded = load_config(args.config, args.overrides)
    # Stages that run here (run, submit --cluster local) need the data here; on a cluster
    # a path may name the cluster's filesystem, so only what exists here is opened.
    runs_here = args.command == "run" or getattr(args, "cluster", None) == "local"
    check_data_source(loaded.config.data, must_exist=runs_here)
    return loaded


def _cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.study import build_study_graph

    loaded = _load(args)
    graph = build_study_graph(loaded.config)
    config = loaded.config
    print(f"study {config.study}: {len(graph)} stages, in the order they can run")
    width = max(len(stage.name) for stage in graph)
    for stage in graph:
        res = stage.resources
        where = f"{res.nodes}x{res.gpus_per_node} gpu" if res.gpus_per_node else "cpu"
        after = ", ".join(stage.dependencies) or "-"
        print(f"  {stage.name:<{width}}  {stage.kind:<10} {where:<10} after: {after}")
    print(f"ok: {loaded.source} is valid")
    return EXIT_OK


def _backend(args: argparse.Namespace, cluster: str, config) -> Backend:
    options = {"max_parallel": getattr(args, "max_parallel", None), "runtime": getattr(args, "runtime", None)}
    if cluster != "local" and options["runtime"]:
        raise ConfigError(f"--runtime: only for --cluster local (cluster {cluster} runs images itself)")
    backend_class = backend_for(cluster)
    return backend_class(backend_class.settings_from(config, options))


def _plan(args: argparse.Namespace, cluster: str):
    """Load, build and fingerprint the run, in memory: nothing is written."""
    from pipeline.plan import plan_run

    loaded = _load(args)
    backend = _backend(args, cluster, loaded.config)
    layout = RunLayout(_usable_dir("--root", args.root), _run_id(args, loaded.config.study))
    plan = plan_run(loaded.config, layout.run_id, backend.stage_root(layout),
                    backend.tracking(loaded.config, layout), backend.name)
    return loaded, layout, plan, backend


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.backends.local import driver_for
    from pipeline.display import StatusView
    from pipeline.prepare import rerun_lines
    from pipeline.runlock import acquire_run_lock

    loaded, layout, plan, backend = _plan(args, "local")
    _check_images(backend, plan)  # before the lock: a refused run leaves nothing behind
    with acquire_run_lock(layout, "run"):
        prepared = backend.prepare(plan, layout, yaml.safe_dump(loaded.raw, sort_keys=False))
        if not prepared.to_run:
            print(f"{layout.run_id}: all {len(plan.graph)} stages already succeeded (cached)")
            return EXIT_OK
        view = StatusView(f"{layout.run_id} ({layout.run_dir})", live=False if args.plain else None)
        for line in rerun_lines(prepared.reasons):  # what ran before and runs again, and why
            print(line)
        driver = driver_for(layout, prepared.record, backend.settings, on_change=view.update)
        with view:
            states = driver.run()
    failed = [name for name, state in states.items() if state.value in ("failed", "blocked")]
    interrupted = [name for name, state in states.items() if state.value == "interrupted"]
    if interrupted:
        print(f"{layout.run_id}: interrupted; `python -m pipeline run` again resumes it")
        return EXIT_INTERRUPTED
    if failed:
        print(f"{layout.run_id}: {len(failed)} stage(s) did not succeed: {', '.join(failed)}; "
              f"see `python -m pipeline logs {layout.run_id} <stage>`")
        return EXIT_FAILED
    print(f"{layout.run_id}: all {len(states)} stages succeeded; artifacts in {layout.run_dir}")
    return EXIT_OK


def _check_images(backend: Backend, plan) -> None:
    """--runtime docker: every image pinned, present and built from this checkout's stages."""
    settings = backend.settings
    if isinstance(settings, LocalSettings) and settings.runtime == "docker":
        from pipeline.docker_runtime import DockerLauncher
        from pipeline.prepare import run_record

        DockerLauncher(settings.docker_network).check(run_record(plan, "local", {}, None))


def _cmd_submit(args: argparse.Namespace) -> int:
    loaded, layout, plan, backend = _plan(args, args.cluster)
    _check_images(backend, plan)
    print(backend.submit(plan, layout, yaml.safe_dump(loaded.raw, sort_keys=False)))
    if backend.pulls_images():
        _warn_unpinned(plan)
    _warn_unpinned_hub_ids(plan)
    if args.watch:
        return _watch(backend, layout)
    return EXIT_OK


def _watch(backend: Backend, layout: RunLayout, interval_s: float = 5.0) -> int:
    """Poll the backend's status (a batch of list calls) until every stage has finished."""
    import time

    from pipeline.display import StatusView

    record = read_record(layout)
    with StatusView(f"{layout.run_id} ({layout.run_dir})") as view:
        while True:
            statuses = backend.status(layout, record)
            view.update(statuses)
            if all(status.state.finished for status in statuses):
                break
            time.sleep(interval_s)
    failed = [s for s in statuses if s.state.value in ("failed", "blocked", "cancelled")]
    if failed:
        print(f"{layout.run_id}: {len(failed)} stage(s) did not succeed: {', '.join(s.name for s in failed)}")
        first = next((s for s in failed if s.state.value == "failed" and s.note), None)
        if first is not None:
            print(f"  {first.name}: {first.note}")
        return EXIT_FAILED
    print(f"{layout.run_id}: all {len(statuses)} stages succeeded")
    return EXIT_OK


def _cmd_render(args: argparse.Namespace) -> int:
    """Pure: no network, no MLflow, no cluster, nothing written outside -o DIR."""
    _usable_dir("-o", args.output)
    _, layout, plan, backend = _plan(args, args.cluster)
    for path in backend.render(plan, layout, args.output):
        print(path)
    if backend.pulls_images():
        _warn_unpinned(plan)
    _warn_unpinned_hub_ids(plan)
    return EXIT_OK


def _usable_dir(option: str, path: Path) -> Path:
    """`path` resolved; a path that is a file, or that the OS cannot take, is bad input."""
    if any("\ud800" <= char <= "\udfff" for char in str(path)):  # argv bytes that were not UTF-8
        raise ConfigError(f"{option} {path}: not valid UTF-8 (stage specs hold paths as UTF-8 JSON)")
    try:
        resolved = path.resolve()
        existing = next(p for p in (resolved, *resolved.parents) if p.exists())  # "/" always exists
        is_dir = existing.is_dir()
    except (OSError, ValueError) as error:
        raise ConfigError(f"{option} {path}: not a usable path: {error}") from None
    if not is_dir:
        where = "" if existing == resolved else f" ({existing} is a file)"
        raise ConfigError(f"{option} {path}: not a directory{where}")
    return resolved


def _warn_unpinned(plan) -> None:
    """Jobs on a cluster pull their image on every node: a tag without a digest may name other
    bytes tomorrow. One line names the images the run uses that no digest pins."""
    used = sorted({stage.image for stage in plan.graph})
    unpinned = [name for name in used if "@sha256:" not in plan.image_refs[name]]
    if unpinned:
        print(f"warning: image(s) {', '.join(f'{n} ({plan.image_refs[n]})' for n in unpinned)} not pinned by "
              "digest: `python -m pipeline images build|push|lock` fills images/lock.yaml "
              "(images.strict: true refuses unpinned images)", file=sys.stderr)


def _warn_unpinned_hub_ids(plan) -> None:
    """A hub id without a revision loads whatever the hub serves when each stage starts: one line
    names each such id and where it is read (the study-scale profiles pin theirs)."""
    from pipeline.inputs import unpinned_warning

    warning = unpinned_warning(plan.graph)
    if warning:
        print(warning, file=sys.stderr)


def _layout_for(args: argparse.Namespace) -> RunLayout:
    """The run a status/logs/cancel/verify/report/sync command names (default: the latest); a run
    that does not exist is bad input like any other (exit 2)."""
    root = _usable_dir("--root", args.root)
    runs = list_runs(root)
    if args.run_id is None:
        if not runs:
            raise ConfigError(f"--root {root}: no runs here; start one with `python -m pipeline run -c CONFIG`")
        return RunLayout(root, runs[0])
    if args.run_id not in runs or not is_dns1123_label(args.run_id):
        known = f"; runs: {', '.join(runs[:10])}" if runs else ""
        raise ConfigError(f"run '{args.run_id}': no such run under {root}{known}")
    return RunLayout(root, args.run_id)


def _recorded(args: argparse.Namespace) -> tuple[RunLayout, RunRecord, Backend]:
    layout = _layout_for(args)
    record = read_record(layout)
    return layout, record, backend_for(record.cluster).for_record(record)


def _cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pipeline.display import status_table

    layout, record, backend = _recorded(args)
    statuses = backend.status(layout, record)
    Console().print(status_table(statuses, f"{layout.run_id} ({layout.run_dir})"))
    return EXIT_OK


def _cmd_logs(args: argparse.Namespace) -> int:
    layout, record, backend = _recorded(args)
    if args.stage not in record.stages:
        raise ConfigError(f"logs: run {layout.run_id} has no stage '{args.stage}'; "
                          f"stages: {', '.join(record.stages)}")
    text = backend.logs(layout, record, args.stage)
    lines = text.splitlines()
    print("\n".join(lines[-args.tail:] if args.tail else lines))
    return EXIT_OK


def _cmd_cancel(args: argparse.Namespace) -> int:
    layout, record, backend = _recorded(args)
    stopped = backend.cancel(layout, record)
    print(f"{layout.run_id}: cancelled {', '.join(stopped) if stopped else 'nothing (no stage was running)'}")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    """Hash every output every succeeded stage recorded, and say which no longer match."""
    from contract.markers import read_marker, success_problem

    layout, record, _ = _recorded(args)
    broken = 0
    for name, info in record.stages.items():
        marker = read_marker(layout.stage_dir(name))
        if marker is None or marker.state != "succeeded" or marker.fingerprint != info.fingerprint:
            print(f"{name}: not succeeded")
            continue
        problem = success_problem(layout.stage_dir(name), info.fingerprint, full=True)
        broken += problem is not None
        print(f"{name}: {problem or f'ok ({len(marker.outputs)} outputs)'}")
    if broken:
        print(f"{layout.run_id}: {broken} succeeded stage(s) do not verify; `python -m pipeline run` reruns them")
        return EXIT_FAILED
    print(f"{layout.run_id}: every succeeded stage's outputs verify")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import print_report

    layout, record, _ = _recorded(args)
    return print_report(layout, record)


def _cmd_sync(args: argparse.Namespace) -> int:
    from pipeline.sync import sync_run

    layout, record, _ = _recorded(args)
    return sync_run(layout, record)


def _cmd_config(args: argparse.Namespace) -> int:
    if args.config:
        from pipeline.loader import load_config

        loaded = load_config(args.config, args.overrides)
        print(yaml.safe_dump(loaded.config.model_dump(mode="json"), sort_keys=False), end="")
        return EXIT_OK
    from pipeline.config_doc import describe_config

    print(describe_config())
    return EXIT_OK


def _cmd_images(args: argparse.Namespace) -> int:
    from pipeline.images_cli import run_images_command

    return run_images_command(args)


_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "images": _cmd_images,
    "validate": _cmd_validate,
    "run": _cmd_run,
    "submit": _cmd_submit,
    "render": _cmd_render,
    "status": _cmd_status,
    "logs": _cmd_logs,
    "cancel": _cmd_cancel,
    "report": _cmd_report,
    "sync": _cmd_sync,
    "verify": _cmd_verify,
    "config": _cmd_config,
}
