"""Errors shared by the precision backends (torch-free)."""


class PrecisionUnavailable(RuntimeError):
    """A backend cannot run a recipe here; the message is one line naming what to choose instead."""
