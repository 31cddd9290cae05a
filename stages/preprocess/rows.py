"""What makes a source row usable, the same rules for every source (no torch, no `datasets`).

A row is usable when the configured text columns hold non-blank strings (input/output), or
the messages column holds a list of {role, content} turns with a non-blank assistant turn.
Anything else is a bad row, and the reason names the column and what it held instead, e.g.
"output is a number (4), not a string" rather than "empty output".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ChatColumns:
    input_column: str = "input"
    output_column: str = "output"
    messages_column: str | None = None
    system_prompt: str | None = None

    def required(self) -> list[str]:
        return [self.messages_column] if self.messages_column else [self.input_column, self.output_column]


# JSON's own names for Python's values (rows come from JSON, parquet or a hub dataset).
_TYPE_NAMES = ((bool, "a boolean"), (int, "a number"), (float, "a number"), (str, "a string"),
               (list, "an array"), (tuple, "an array"), (dict, "an object"))


def describe(value: Any) -> str:
    """`a number (4)`, `null`, `an object ({"a": 1, ...)`: what a bad value is, briefly."""
    if value is None:
        return "null"
    name = next((text for kind, text in _TYPE_NAMES if isinstance(value, kind)), type(value).__name__)
    shown = repr(value)
    return f"{name} ({shown[:40]}{'...' if len(shown) > 40 else ''})"


def row_problem(row: Mapping[str, Any], columns: ChatColumns) -> str | None:
    """None for a usable row, else why it is not (one line, names the column)."""
    for name in columns.required():
        if name not in row:
            return f"has no column {name!r} (columns: {sorted(map(str, row))[:10]}); " \
                   "set input_column/output_column or messages_column"
    if columns.messages_column:
        return _messages_problem(columns.messages_column, row[columns.messages_column])
    for name in (columns.output_column, columns.input_column):
        problem = _text_problem(name, row[name])
        if problem:
            return problem
    return None


def _text_problem(name: str, value: Any) -> str | None:
    if not isinstance(value, str):
        return f"{name} is {describe(value)}, not a string"
    if not value.strip():
        return f"empty {name}"
    return _unicode_problem(name, value)


def _messages_problem(name: str, chat: Any) -> str | None:
    if not isinstance(chat, (list, tuple)):
        return f"{name} is {describe(chat)}, not a list of {{role, content}}"
    for number, turn in enumerate(chat):
        where = f"{name}[{number}]"
        if not isinstance(turn, Mapping):
            return f"{where} is {describe(turn)}, not a {{role, content}} object"
        role, content = turn.get("role"), turn.get("content")
        if not isinstance(role, str) or not role.strip():
            return f"{where}.role is {describe(role)}, not a role name"
        if not isinstance(content, str):
            return f"{where}.content is {describe(content)}, not a string"
        problem = _unicode_problem(f"{where}.role", role) or _unicode_problem(f"{where}.content", content)
        if problem:
            return problem
    assistant = [turn["content"] for turn in chat if turn["role"] == "assistant"]
    if not assistant:
        return "no assistant turn"
    if any(not content.strip() for content in assistant):
        return "empty assistant turn"
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode_problem(name: str, text: str) -> str | None:
    # JSON's "\ud800" escapes decode to lone surrogates, which no tokenizer or file can hold.
    found = _SURROGATE.search(text)
    return f"{name} is not valid Unicode (a lone surrogate \\u{ord(found.group()):04x})" if found else None


def as_chat(row: Mapping[str, Any], columns: ChatColumns) -> list[dict[str, str]]:
    """The chat of a usable row (`row_problem` returned None), with the system prompt."""
    if columns.messages_column:
        chat = [{"role": turn["role"], "content": turn["content"]} for turn in row[columns.messages_column]]
    else:
        chat = [{"role": "user", "content": row[columns.input_column]},
                {"role": "assistant", "content": row[columns.output_column]}]
    if columns.system_prompt and chat[0]["role"] != "system":
        chat = [{"role": "system", "content": columns.system_prompt}, *chat]
    return chat
