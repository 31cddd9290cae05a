"""Errors the CLI reports as one line and exit code 2."""


class ConfigError(ValueError):
    """Invalid configuration or CLI input: the message names the field or file (and line)."""


class BackendError(RuntimeError):
    """A backend could not do what was asked (e.g. a scheduler rejected a job)."""


# C0 controls (but tab), DEL, C1 controls and Unicode's line separators, shown escaped: a value with a newline or a terminal escape
# in it still makes one line, and one that cannot corrupt the terminal.
_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0)) if code != 0x09}
_CONTROLS.update({0x2028: "\\u2028", 0x2029: "\\u2029"})  # line breaks to str.splitlines
_CONTROLS.update({0x0A: "\\n", 0x0D: "\\r"})


def one_line(text: str) -> str:
    """`text` on one line, control characters escaped (messages quote the user's values)."""
    return text.strip().translate(_CONTROLS)
