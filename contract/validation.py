"""The first problem of a pydantic validation error, in the words every one-line error uses."""

from __future__ import annotations

from pydantic import ValidationError


def first_problem(error: ValidationError) -> tuple[str, str]:
    """(dotted location, message) of the first problem; the location is '' for the whole model."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")  # cross-field checks name their fields
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required field is missing"
    return where, message


def one_line(error: ValidationError) -> str:
    where, message = first_problem(error)
    return f"{where}: {message}" if where else message
