"""Errors the CLI reports as one line and exit code 2."""


class ConfigError(ValueError):
    """Invalid configuration or CLI input: the message names the field or file (and line)."""


class BackendError(RuntimeError):
    """A backend could not do what was asked (e.g. a scheduler rejected a job)."""
