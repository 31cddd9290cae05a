"""Load a study config: profile name or YAML path, `--set` overrides, one-line errors.

Errors name the file and line (or the `--set` that introduced the value) and the dotted
field path, e.g. `smoke.yaml:14: runs.fp8.recipe: unknown recipe 'fp9' ...`.
"""

from __future__ import annotations

import re
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
_SURROGATE = re.compile("[\ud800-\udfff]")  # argv bytes that were not UTF-8 (surrogateescape)


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


@dataclass
class LoadedConfig:
    config: StudyConfig
    source: Path
    raw: dict[str, Any]  # after overrides and path resolution: what config.yaml of a run holds
    lines: dict[tuple[str, ...], int] = field(default_factory=dict)


def resolve_source(name_or_path: str) -> Path:
    if _SURROGATE.search(name_or_path):  # argv bytes that were not UTF-8 (surrogateescape)
        raise ConfigError(f"-c {name_or_path}: not valid UTF-8 (stage specs hold paths as UTF-8 JSON)")
    try:  # a NUL byte or an over-long name is no path the OS can look up
        candidate = Path(name_or_path)
        is_path = candidate.suffix in (".yaml", ".yml") or candidate.exists()
        if is_path and not candidate.is_file():
            raise ConfigError(f"{name_or_path}: config file not found")
    except (OSError, ValueError) as error:
        raise ConfigError(f"-c {name_or_path}: not a usable path: {error}") from None
    if is_path:
        return candidate
    profile = PROFILES_DIR / f"{name_or_path}.yaml"
    if name_or_path not in profile_names():
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
    lines: dict[tuple[str, ...], int] = {}
    raw = _load_yaml(text, str(source), lines)
    if raw is _EMPTY:
        raise ConfigError(f"{source}: empty config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}:{lines.get((), 1)}: the config must be a mapping")
    return raw, lines


_EMPTY = object()  # a YAML document with no node at all (empty text or only comments)
MAX_DEPTH = 32  # deeper nesting is no config of ours; PyYAML itself recurses per level
MAX_VALUES = 20_000  # values after alias expansion ("billion laughs" stops here)


def _load_yaml(text: str, where: str, lines: dict[tuple[str, ...], int]) -> Any:
    """Parse one YAML document into plain, unshared values, or raise a one-line ConfigError.

    Checked on the node graph before anything is built: duplicate keys (PyYAML keeps the last
    silently), aliases that contain themselves, nesting deeper than MAX_DEPTH. Aliases are then
    expanded into copies (so a `--set` changes one place only), at most MAX_VALUES values.
    """
    try:
        loader = yaml.SafeLoader(text)  # the reader checks the characters here already
    except yaml.YAMLError as error:
        raise ConfigError(_yaml_error(error, where)) from None
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"{where}: invalid YAML: nested deeper than {MAX_DEPTH} levels") from None
        except yaml.YAMLError as error:
            raise ConfigError(_yaml_error(error, where)) from None
        if node is None:
            return _EMPTY
        _check_keys(node, (), where, lines, [])
        try:
            value = loader.construct_document(node)
        except yaml.YAMLError as error:  # e.g. an unhashable key, an unknown tag
            raise ConfigError(_yaml_error(error, where)) from None
    finally:
        loader.dispose()
    return _unshare(value, where, [0], 0)


def _yaml_error(error: yaml.YAMLError, where: str) -> str:
    mark = getattr(error, "problem_mark", None)
    at = f"{where}:{mark.line + 1}" if mark else where
    problem = getattr(error, "problem", None) or (str(error).splitlines() or [type(error).__name__])[0]
    return f"{at}: invalid YAML: {problem}"


def _check_keys(
    node: yaml.Node, path: tuple[str, ...], where: str, lines: dict, ancestors: list[yaml.Node]
) -> None:
    """Reject duplicate keys, self-containing aliases and deep nesting; record each key's line.

    A node reached again through an alias is not walked again: its keys were checked the first
    time, so the walk stays linear in the size of the text whatever the aliases expand to.
    """
    lines.setdefault(path, node.start_mark.line + 1)
    if any(node is ancestor for ancestor in ancestors):
        raise ConfigError(f"{where}:{node.start_mark.line + 1}: '{'.'.join(path) or 'config'}' "
                          "contains itself (a recursive alias)")
    if len(ancestors) >= MAX_DEPTH:
        raise ConfigError(f"{where}:{node.start_mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
    if getattr(node, "_checked", False):
        return
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen and key != "<<":
                dotted = ".".join((*path, key))
                raise ConfigError(f"{where}:{key_node.start_mark.line + 1}: duplicate key '{dotted}'")
            seen.add(key)
            lines[(*path, key)] = key_node.start_mark.line + 1
            _check_keys(key_node, (*path, key), where, {}, [*ancestors, node])
            _check_keys(value_node, (*path, key), where, lines, [*ancestors, node])
            lines[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_keys(item, (*path, str(index)), where, lines, [*ancestors, node])
    node._checked = True  # type: ignore[attr-defined]


def _unshare(value: Any, where: str, count: list[int], depth: int) -> Any:
    """A copy in which every alias is its own value, within MAX_VALUES values and MAX_DEPTH
    levels (aliases nested in aliases can go deeper than the text does)."""
    count[0] += 1
    if count[0] > MAX_VALUES:
        raise ConfigError(f"{where}: expands to more than {MAX_VALUES} values (through aliases)")
    if depth > MAX_DEPTH:
        raise ConfigError(f"{where}: nested deeper than {MAX_DEPTH} levels (through aliases)")
    if isinstance(value, dict):
        return {key: _unshare(item, where, count, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [_unshare(item, where, count, depth + 1) for item in value]
    return value


def _parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    if _SURROGATE.search(item):  # bytes that were not UTF-8 in argv (surrogateescape)
        raise ConfigError(f"--set {item}: not valid UTF-8 text")
    key, sep, value_text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item}: expected key.path=value")
    path = tuple(part for part in key.strip().split("."))
    if any(not part for part in path):
        raise ConfigError(f"--set {item}: empty part in key path '{key}'")
    if not value_text.strip():
        return path, ""
    try:
        value = _load_yaml(value_text, f"--set {item}", {})
    except ConfigError as error:
        if "invalid YAML" not in str(error):
            raise  # a value that is YAML but recursive, too deep or too large
        value = value_text  # not YAML: the text itself, e.g. `--set description=a: b`
    return path, None if value is _EMPTY else value


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
    runs = raw.get("runs")
    for name, run in runs.items() if isinstance(runs, dict) else ():
        if isinstance(run, dict):
            _resolve_at(run, ("recipe",), base, f"runs.{name}.")


def _resolve_at(node: Any, path: tuple[str, ...], base: Path, prefix: str = "") -> None:
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        return
    value = node.get(path[-1])
    if isinstance(value, str) and value.startswith(PATH_PREFIXES):
        try:
            node[path[-1]] = str((base / value).resolve())
        except (OSError, ValueError) as error:  # a NUL byte, a name too long for the OS
            raise ConfigError(f"{prefix}{'.'.join(path)}: '{value}' is not a usable path: {error}") from None


def _default_tokenizer_to_model(raw: dict[str, Any]) -> None:
    """The study's tokenizer is the model's, at the model's revision, unless data.tokenizer says
    otherwise."""
    data = raw.get("data")
    if isinstance(data, dict) and "tokenizer" not in data and isinstance(raw.get("model"), str):
        data["tokenizer"] = raw["model"]
        hub_model = not raw["model"].startswith(PATH_PREFIXES)  # else the config refuses model_revision
        if hub_model and raw.get("model_revision") is not None and "tokenizer_revision" not in data:
            data["tokenizer_revision"] = raw["model_revision"]


def _describe(
    error: ValidationError, source: Path, lines: dict, set_paths: dict[tuple[str, ...], str]
) -> str:
    dotted, message = first_problem(error)
    loc = tuple(str(part) for part in error.errors()[0]["loc"])
    if not loc:  # a check across fields names its path first: "runs.x.resources: ..."
        named = re.match(r"([\w-]+(?:\.[\w-]+)+): (.+)", message)
        if named:
            loc, message = tuple(named.group(1).split(".")), named.group(2)
            dotted = ".".join(loc)
    inside = [item for path, item in set_paths.items() if loc and path[: len(loc)] == loc]
    if inside:  # a --set below the field that failed, e.g. runs.x.resources.gpus=2
        return f"--set {inside[-1]}: {dotted}: {message}"
    for depth in range(len(loc), -1, -1):
        if loc[:depth] in set_paths:
            return f"--set {set_paths[loc[:depth]]}: {dotted}: {message}"
        if loc[:depth] in lines:
            return f"{source}:{lines[loc[:depth]]}: {dotted or 'config'}: {message}"
    return f"{source}: {dotted}: {message}"
