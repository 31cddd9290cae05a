"""Generated argument lists for every subcommand of `python -m pipeline` (walked from
build_parser): each ends in success or one line with exit 2 (1: a run's own failure), and
writes nothing. Nothing here may start work: `-c` only ever names configs that do not
validate for the commands that would run or submit stages or talk to Docker."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from pipeline.cli import build_parser
from tests.fuzz import (
    ARGV_TEXT,
    SPECIAL_TEXT,
    TIME_LIMIT,
    assert_clean_ending,
    examples,
    run_cli,
    tree,
)

STARTS_WORK = {"run", "submit", "render", "images"}  # with a valid config these would do real work


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


COMMANDS = _subparsers(build_parser())


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A working directory with configs that do not validate, a run to look at, and a log."""
    path = tmp_path_factory.mktemp("fuzz-cli")
    (path / "bad.yaml").write_text("study: Not_A_Label\nmodel: m\ndata: {source: ./none.jsonl}\n"
                                   "runs: {bf16: {recipe: bf16, backend: emulated}}\n")
    (path / "recursive.yaml").write_text("a: &x [*x]\n")
    (path / "no-data.yaml").write_text("study: fuzz\nmodel: ./m\ndata: {source: ./none.jsonl}\n"
                                       "runs: {bf16: {recipe: bf16, backend: emulated}}\n")
    (path / "good.yaml").write_text("study: fuzz\nmodel: Qwen/Qwen3-0.6B\ndata: {source: nvidia/OpenScience}\n"
                                    "runs: {bf16: {recipe: bf16, backend: emulated}}\n")
    run = path / "runs" / "seen"
    (run / "a").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"run_id": "seen", "cluster": "local", "stages": {
        "a": {"kind": "probe", "upstream": {}, "fingerprint": "f", "image": "i", "tags": {}}}, "tracking": None}))
    (run / "a" / "stage.log").write_text("line 1\nline 2\n")
    return path


BAD_CONFIGS = ["bad.yaml", "recursive.yaml", "missing.yaml", "nope"]  # each fails to load
NO_DATA = "no-data.yaml"  # loads, but `run` stops at its missing data


@st.composite
def argv(draw) -> list[str]:
    command = draw(st.sampled_from([*COMMANDS, "bogus", ""]))
    tokens = [command] if command else []
    sub = COMMANDS.get(command)
    if command == "images":
        action = draw(st.sampled_from(["build", "push", "lock", "unlock"]))
        tokens.append(action)
        sub = _subparsers(sub).get(action, sub)
    options = [a for a in sub._actions if a.option_strings] if sub else []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 9))
        if kind < 6 and options:
            action = draw(st.sampled_from(options))
            tokens.append(draw(st.sampled_from(action.option_strings)))
            if action.nargs != 0:
                tokens.append(draw(value_for(action, command)))
        elif kind < 8:
            tokens.append(draw(st.one_of(ARGV_TEXT, SPECIAL_TEXT.filter(lambda t: "\x00" not in t),
                                         st.sampled_from(["seen", "nosuch", "a", "-h", "--help", "--"]))))
        else:
            tokens.append(draw(st.sampled_from(["--root", "-c", "--config", "--set", "--tail", "--cluster"])))
    return tokens


def value_for(action: argparse.Action, command: str) -> st.SearchStrategy:
    if action.dest == "config":
        configs = {"run": [*BAD_CONFIGS, NO_DATA]}.get(command, BAD_CONFIGS) if command in STARTS_WORK \
            else [*BAD_CONFIGS, NO_DATA, "good.yaml", "smoke"]
        return st.sampled_from(configs)
    if action.dest == "root":
        return st.sampled_from(["runs", "elsewhere", "runs/seen/run.json", "", "/proc"])
    if action.choices:
        return st.one_of(st.sampled_from(list(action.choices)), ARGV_TEXT)
    if action.type in (int,) or action.dest in ("max_parallel", "tail"):
        return st.one_of(st.integers(-5, 10**20).map(str), ARGV_TEXT)
    return st.one_of(ARGV_TEXT, SPECIAL_TEXT.filter(lambda t: "\x00" not in t))


def starts_work(tokens: list[str], sandbox: Path) -> bool:
    """True when these arguments could run, submit, render or build: their config loads (and
    for `run`, its data is there). Checked by loading, not trusted from the strategy."""
    from pipeline.data_check import check_data_source
    from pipeline.errors import ConfigError
    from pipeline.loader import load_config

    try:
        args = build_parser().parse_args(tokens)
    except SystemExit:
        return False
    if args.command not in STARTS_WORK:
        return False
    if getattr(args, "config", None) is None:
        return True  # `images ...` without -c uses the built-in refs
    try:
        loaded = load_config(str(sandbox / args.config) if (sandbox / args.config).exists() else args.config,
                             args.overrides)
        if args.command == "run":
            check_data_source(loaded.config.data, must_exist=True)
    except ConfigError:
        return False
    return True


@TIME_LIMIT
@settings(max_examples=examples(800))
@given(tokens=argv())
def test_generated_argument_lists_end_in_success_or_one_line(sandbox: Path, tokens: list[str], monkeypatch) -> None:
    assume(not starts_work(tokens, sandbox))
    monkeypatch.chdir(sandbox)
    before = tree(sandbox)
    outcome = run_cli(tokens)
    event(f"{tokens[0] if tokens else '-'}: exit {outcome.code}")
    assert_clean_ending(outcome, allowed=(0, 1, 2))
    if outcome.code == 1:  # only `report` of a run without a report stage fails that way here
        assert tokens[0] == "report", outcome
    if outcome.code == 0 and tokens and tokens[0] in STARTS_WORK:
        assert outcome.out.startswith("usage: "), outcome  # only asking for help succeeds
    assert tree(sandbox) == before  # looking, validating and refusing write nothing
