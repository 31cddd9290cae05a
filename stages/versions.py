"""Versions of the packages a stage's numbers depend on, for the report (torch-free)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

# The packages whose code computes a train or eval stage's numbers (those installed are listed).
NUMERICS_PACKAGES = ("torch", "transformers", "triton", "torchao", "nvidia-modelopt",
                     "transformer-engine", "lm-eval", "numpy")


def package_versions(names: tuple[str, ...] = NUMERICS_PACKAGES) -> dict[str, str]:
    """{package: version} of those installed, plus the Python that ran them."""
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found
