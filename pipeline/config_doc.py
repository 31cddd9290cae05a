"""`python -m pipeline config`: every config field with its type, default and description."""

from __future__ import annotations

from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from contract.kinds import STAGE_KINDS
from contract.recipe import Recipe
from pipeline.config import RunConfig, StudyConfig
from pipeline.resources import Resources


def describe_config() -> str:
    lines = ["Study config fields (YAML; override any with --set key.path=value):", ""]
    _describe_model(StudyConfig, "", lines)
    lines += ["", "runs.<name> (one per run):"]
    _describe_model(RunConfig, "runs.<name>.", lines)
    lines += ["", f"resources.<kind> (kinds: {', '.join(STAGE_KINDS)}):"]
    _describe_model(Resources, "resources.<kind>.", lines)
    return "\n".join(lines)


def _describe_model(model: type[BaseModel], prefix: str, lines: list[str]) -> None:
    for name, field in model.model_fields.items():
        annotation = field.annotation
        nested = _nested_model(annotation)
        if nested is Recipe:  # given by name or path; its own fields: `python -m stages.precision` and contract/recipe.py
            lines.append(f"{prefix}{name} (recipe name | YAML path | mapping, required): {field.description or ''}")
            continue
        if nested is not None and name not in ("runs", "resources"):
            lines.append(f"{prefix}{name}: {field.description or ''}")
            _describe_model(nested, f"{prefix}{name}.", lines)
            continue
        default = _default_text(field)
        lines.append(f"{prefix}{name} ({_type_text(annotation)}{default}): {field.description or ''}")


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model inside `Model` or `Model | None` (optional sections such as slurm, k8s)."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _type_text(annotation: Any) -> str:
    if get_origin(annotation) is not None and str(get_origin(annotation)).endswith("Literal"):
        return " | ".join(repr(arg) for arg in get_args(annotation))
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "")


def _default_text(field: Any) -> str:
    if field.default is not PydanticUndefined:
        return f", default {field.default!r}"
    if field.default_factory is not None:
        return ", has default"
    return ", required"
