"""Property-based tests of every input surface: shared strategies, the CLI harness, profiles.

Every generated input must end in one of: success, or one line on stderr with exit 2 (bad
input) or 1 (a stage's runtime failure); never a traceback, never a half-written artifact.

Profiles (hypothesis settings):
  ci    (default) bounded and deterministic: each test runs `examples(n)` examples, about
        4,000 in all, derandomized, no example database written into the repo;
  long  FASTER_QAT_FUZZ=long: 25 times as many, random, with the example database, for a
        run on demand (e.g. before a release, or overnight).
"""

from __future__ import annotations

import contextlib
import io
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from pydantic import BaseModel

LONG = os.environ.get("FASTER_QAT_FUZZ") == "long"
settings.register_profile(
    "ci", deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
settings.register_profile(
    "long", deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
settings.load_profile("long" if LONG else "ci")


def examples(n: int) -> int:
    """Examples for one property: n in CI, 25 n in the long profile."""
    return n * 25 if LONG else n


# The long profile outlasts the suite's per-test limit (pytest-timeout, 900 s): no limit there.
TIME_LIMIT = pytest.mark.timeout(0 if LONG else 900)


# --- hostile values ---------------------------------------------------------------------------

# Real argv cannot hold NUL, and undecodable bytes arrive as lone surrogates U+DC80..U+DCFF
# (surrogateescape): that is the alphabet of the CLI's strings.
ARGV_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
    | st.sampled_from([chr(c) for c in range(0xDC80, 0xDD00)]),
    max_size=40,
)
# What YAML and JSON files can hold (any code point but lone surrogates).
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
SPECIAL_TEXT = st.sampled_from([
    "", " ", "\n", "\t", "~", "null", "true", "yes", "off", "1e999", "-0", "0x1f", "NaN", ".inf",
    "&x [*x]", "*undefined", "!!python/object:os.system", "[[[[[[", "{{{{", "a: b: c", "- - -",
    "../../etc/passwd", "/dev/null", "/", ".", "./", "smoke", "Qwen/Qwen3-0.6B", "é" * 50, "🤖",
    "a" * 300, "\u202e\u0041", "\x1b[31mred", "line\nbreak", "tab\there", "\ufeffbom", "%s%n",
    "/" + "a" * 300, "a" * 300 + ".yaml", "./" + "b" * 256 + ".jsonl", "x/" * 200, "/tmp", "/proc/self/mem",
    "fixtures/tiny*", "*.jsonl", "[", "~root", "C:\\x", "a b", "-", "--", "-c", "=", "a=b",
])
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**63, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-320, 1e308, float("inf"), float("nan")]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT, SPECIAL_TEXT)


def nested(leaves: st.SearchStrategy = SCALARS, depth: int = 4) -> st.SearchStrategy:
    """Lists and mappings of hostile leaves, a few levels deep."""
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.one_of(TEXT, SPECIAL_TEXT), children, max_size=4),
        ),
        max_leaves=12,
    )


VALUES = st.one_of(SCALARS, nested(), st.builds(lambda n: [[[[n]]]], SCALARS))


def deep(levels: int, leaf: str = "1") -> str:
    return "[" * levels + leaf + "]" * levels


# --- the schema's paths -----------------------------------------------------------------------


def schema_paths(model: type[BaseModel], prefix: tuple[str, ...] = (), depth: int = 0) -> list[tuple[tuple[str, ...], Any]]:
    """(path, annotation) of every field below `model`, models inside dicts included (under a
    placeholder key `*`), e.g. (("runs", "*", "recipe"), str)."""
    found: list[tuple[tuple[str, ...], Any]] = []
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        found.append((path, field.annotation))
        if depth > 4:
            continue
        for inner in _models_in(field.annotation):
            key = ("*",) if get_origin(field.annotation) is dict else ()
            found += schema_paths(inner, (*path, *key), depth + 1)
    return found


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in _models_in(arg)]


def values_for(annotation: Any) -> st.SearchStrategy:
    """Values that fit the annotation now and then, and hostile ones always."""
    fitting: list[st.SearchStrategy] = []
    for candidate in (annotation, *get_args(annotation)):
        if get_origin(candidate) is typing.Literal:
            fitting.append(st.sampled_from(get_args(candidate)))
        elif candidate is bool:
            fitting.append(st.booleans())
        elif candidate is int:
            fitting.append(st.integers(min_value=-3, max_value=10**12))
        elif candidate is float:
            fitting.append(st.floats(allow_nan=True, allow_infinity=True))
        elif candidate is str:
            fitting.append(st.one_of(TEXT, SPECIAL_TEXT))
    return st.one_of(*fitting, VALUES) if fitting else VALUES


# --- the CLI, in-process, as a terminal would see it ------------------------------------------


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def run_cli(argv: list[str]) -> Outcome:
    """`python -m pipeline ARGV` in this process: stdout is strict UTF-8 and stderr
    backslash-escapes what it cannot encode, as Python sets them up for a UTF-8 terminal.
    Any exception other than SystemExit propagates: that is the traceback a user would see."""
    from pipeline.cli import main

    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", write_through=True)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    return Outcome(code, out.buffer.getvalue().decode(), err.buffer.getvalue().decode())


def assert_clean_ending(outcome: Outcome, allowed: tuple[int, ...] = (0, 2)) -> None:
    """Success, or exactly one line on stderr (`error: ...`) and an allowed exit code."""
    assert outcome.code in allowed, outcome
    if outcome.code != 0:
        lines = outcome.err.splitlines()
        assert len(lines) == 1 and outcome.err.endswith("\n"), outcome.err
        assert lines[0].startswith("error: ") or outcome.code == 1, outcome.err
        assert "Traceback" not in outcome.err


def tree(path: Path) -> dict[str, int]:
    """Every file below `path` with its size: what a command wrote, compared before and after."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def surrogate_safe(text: str) -> bytes:
    """Text with lone surrogates as the bytes a user's file could hold (invalid UTF-8)."""
    return text.encode("utf-8", "surrogatepass")

