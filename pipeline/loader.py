"""Load a study config: profile name or YAML path, `--set` overrides, one-line errors.

Errors name the file and line (or the `--set` that introduced the value) and the dotted
field path, e.g. `smoke.yaml:14: runs.fp8.recipe: unknown recipe 'fp9' ...`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from contract.validation import first_problem
from pipeline.config import StudyConfig
from pipeline.errors import ConfigError

PROFILES_DIR = Path(__file__).with_name("profiles")
PATH_PREFIXES = ("./", "../", "/")


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


@dataclass
class LoadedConfig:
    config: StudyConfig
    source: Path
    raw: dict[str, Any]  # after overrides and path resolution: what config.yaml of a run holds
    lines: dict[tuple[str, ...], int] = field(default_factory=dict)


def resolve_source(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"{name_or_path}: config file not found")
        return candidate
    profile = PROFILES_DIR / f"{name_or_path}.yaml"
    if not profile.is_file():
        raise ConfigError(
            f"-c {name_or_path}: not a file and not a profile; profiles: {', '.join(profile_names())}"
        )
    return profile


def load_config(name_or_path: str, overrides: list[str] | None = None) -> LoadedConfig:
    source = resolve_source(name_or_path)
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{source}: cannot read: {error}") from None
    raw, lines = _parse_yaml(text, source)
    set_paths: dict[tuple[str, ...], str] = {}
    for item in overrides or []:
        path, value = _parse_override(item)
        _apply(raw, path, value, item)
        set_paths[path] = item
    _resolve_paths(raw, source.parent.resolve())
    _default_tokenizer_to_model(raw)
    try:
        config = StudyConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error, source, lines, set_paths)) from None
    return LoadedConfig(config=config, source=source, raw=raw, lines=lines)


def _parse_yaml(text: str, source: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else str(source)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if node is None:
        raise ConfigError(f"{source}: empty config")
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{source}:{node.start_mark.line + 1}: the config must be a mapping")
    lines: dict[tuple[str, ...], int] = {}
    _check_keys(node, (), source, lines)
    return yaml.safe_load(text), lines


def _check_keys(node: yaml.Node, path: tuple[str, ...], source: Path, lines: dict) -> None:
    """Reject duplicate keys (PyYAML keeps the last silently) and record each key's line."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                dotted = ".".join((*path, key))
                raise ConfigError(f"{source}:{key_node.start_mark.line + 1}: duplicate key '{dotted}'")
            seen.add(key)
            lines[(*path, key)] = key_node.start_mark.line + 1
            _check_keys(value_node, (*path, key), source, lines)
            lines[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_keys(item, (*path, str(index)), source, lines)


def _parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    key, sep, value_text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item}: expected key.path=value")
    path = tuple(part for part in key.strip().split("."))
    if any(not part for part in path):
        raise ConfigError(f"--set {item}: empty part in key path '{key}'")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    return path, value


def _apply(raw: dict[str, Any], path: tuple[str, ...], value: Any, item: str) -> None:
    node: Any = raw
    for depth, part in enumerate(path[:-1]):
        child = node.get(part) if isinstance(node, dict) else None
        if child is None:
            child = {}
            node[part] = child
        if not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            raise ConfigError(f"--set {item}: '{where}' is not a mapping")
        node = child
    node[path[-1]] = value


# Fields that hold a model, tokenizer, dataset or recipe location.
_PATH_FIELDS = (
    ("model",),
    ("data", "source"),
    ("data", "tokenizer"),
    ("train", "model"),
    ("eval", "lm_eval_task_dir"),
)


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """`./x`, `../x` and `/x` are paths relative to the config file; anything else is a hub id."""
    for path in _PATH_FIELDS:
        _resolve_at(raw, path, base)
    for run in (raw.get("runs") or {}).values():
        if isinstance(run, dict):
            _resolve_at(run, ("recipe",), base)


def _resolve_at(node: Any, path: tuple[str, ...], base: Path) -> None:
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        return
    value = node.get(path[-1])
    if isinstance(value, str) and value.startswith(PATH_PREFIXES):
        node[path[-1]] = str((base / value).resolve())


def _default_tokenizer_to_model(raw: dict[str, Any]) -> None:
    """The study's tokenizer is the model's unless data.tokenizer says otherwise."""
    data = raw.get("data")
    if isinstance(data, dict) and "tokenizer" not in data and isinstance(raw.get("model"), str):
        data["tokenizer"] = raw["model"]


def _describe(
    error: ValidationError, source: Path, lines: dict, set_paths: dict[tuple[str, ...], str]
) -> str:
    dotted, message = first_problem(error)
    loc = tuple(str(part) for part in error.errors()[0]["loc"])
    for depth in range(len(loc), -1, -1):
        if loc[:depth] in set_paths:
            return f"--set {set_paths[loc[:depth]]}: {dotted}: {message}"
        if loc[:depth] in lines:
            return f"{source}:{lines[loc[:depth]]}: {dotted or 'config'}: {message}"
    return f"{source}: {dotted}: {message}"
