"""The CLI is a contract users and scripts rely on: this test pins it, so a flag is never added,
renamed or dropped by accident. Change it together with the README's CLI section."""

from __future__ import annotations

import argparse

from pipeline.cli import build_parser

SURFACE = {
    "validate": ([], ["--config", "--help", "--set"]),
    "run": ([], ["--config", "--help", "--max-parallel", "--plain", "--root", "--run-id", "--runtime", "--set"]),
    "submit": ([], ["--cluster", "--config", "--help", "--max-parallel", "--root", "--run-id", "--runtime",
                    "--set", "--watch"]),
    "render": ([], ["--cluster", "--config", "--help", "--output", "--root", "--run-id", "--set"]),
    "status": (["run_id"], ["--help", "--root"]),
    "cancel": (["run_id"], ["--help", "--root"]),
    "report": (["run_id"], ["--help", "--root"]),
    "sync": (["run_id"], ["--help", "--root"]),
    "verify": (["run_id"], ["--help", "--root"]),
    "logs": (["run_id", "stage"], ["--help", "--root", "--tail"]),
    "images": (["images_command"], ["--help"]),
    "config": ([], ["--config", "--help", "--set"]),
}


def _surface(parser: argparse.ArgumentParser) -> dict[str, tuple[list[str], list[str]]]:
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: ([a.dest for a in sub._actions if not a.option_strings],
               sorted(o for a in sub._actions for o in a.option_strings if o.startswith("--")))
        for name, sub in commands.choices.items()
    }


def test_cli_surface_is_pinned():
    assert _surface(build_parser()) == SURFACE


def test_only_implemented_clusters_are_offered():
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    submit = next(a for a in commands.choices["submit"]._actions if "--cluster" in a.option_strings)
    render = next(a for a in commands.choices["render"]._actions if "--cluster" in a.option_strings)
    assert sorted(submit.choices) == ["k8s", "local", "nemo-run", "slurm"]
    assert sorted(render.choices) == ["k8s", "nemo-run", "slurm"]
