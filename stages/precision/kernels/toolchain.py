"""Which ptxas assembles the Triton kernels, and whether a fused FP8 cast + transpose is safe.

A ptxas older than 13 miscompiles a kernel that stores an FP8 tile twice, once through a
shared-memory layout conversion (the transposed copy): that copy then holds bytes the kernel
never wrote (triton-lang/triton#11111). Triton 3.6 bundles only ptxas 12.8 and 12.9 (seen on
the H100 machine); Triton 3.9 bundles a ptxas 13.4 and uses it for Hopper. PyTorch's CUDA 13
wheels ship a ptxas 13 (torch/bin/ptxas), which Inductor sets TRITON_PTXAS_PATH to when it
first compiles.

`use_fixed_ptxas()` points Triton at a ptxas >= 13 from either wheel unless the user set one;
`fused_transpose_ok()` says whether the ptxas in use is fixed. Where it is not, the FP8
quantizer writes the transposed copy in a second launch (one more read of x, same bits).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from pathlib import Path

import torch
import triton

_FIXED_MAJOR = 13


def _version(ptxas: str) -> tuple[int, int] | None:
    try:
        text = subprocess.run([ptxas, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else None


def _ptxas_major(arch: int) -> int:
    """Major version of the ptxas Triton would use for compute capability `arch` now (0: unknown)."""
    try:
        from triton.backends.nvidia import compiler

        try:
            tool = compiler.get_ptxas(arch)
        except TypeError:  # Triton versions whose get_ptxas takes no arch
            tool = compiler.get_ptxas()
        return int(str(tool.version).split(".")[0])
    except (ImportError, AttributeError, RuntimeError, ValueError):
        return 0


def use_fixed_ptxas(arch: int = 90) -> None:
    """Before the first Triton compile of the kernels: prefer a ptxas >= 13 for sm_90, the one
    Triton ships for Blackwell or the one PyTorch ships (which Inductor points Triton at)."""
    if os.environ.get("TRITON_PTXAS_PATH") or _ptxas_major(arch) >= _FIXED_MAJOR:
        return
    candidates = [
        Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell",
        Path(torch.__file__).parent / "bin" / "ptxas",
    ]
    for ptxas in candidates:
        version = _version(str(ptxas))
        if version and version[0] >= _FIXED_MAJOR:
            os.environ["TRITON_PTXAS_PATH"] = str(ptxas)
            _forget_cached_ptxas_version()
            return


def _forget_cached_ptxas_version() -> None:
    # Triton caches the ptxas version in its compiled-kernel cache key; a key taken before the
    # switch would reuse kernels assembled by the old ptxas.
    try:
        from triton.backends.nvidia import compiler
    except ImportError:
        return
    cached = getattr(compiler, "get_ptxas_version", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


@functools.cache
def fused_transpose_ok(arch: int) -> bool:
    """True if the ptxas Triton uses for compute capability `arch` (e.g. 90) is fixed; False
    where it cannot tell (the two-launch path is correct everywhere)."""
    return _ptxas_major(arch) >= _FIXED_MAJOR
