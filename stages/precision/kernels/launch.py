"""Triton launches without the JIT's per-call work: the compiled kernel, launched directly.

`kernel[grid](...)` re-derives each argument's specialization, builds a cache-key string, checks
the kernel's globals and builds launch metadata for Triton's profiler hooks on every call: 21 µs
of host time for the amax kernel and 36 µs for the FP8 cast's 21 arguments on the H100 machine
(Triton 3.6), where the compiled kernel's own launcher takes 9 µs (bench/host.py). A training
step makes two or three such launches per quantized tensor, on the host's critical path (a fp8
step waited on its host).

`Launcher` keeps the CompiledKernel per key: each pointer's dtype and 16-byte alignment, each
int's value, the constexprs, num_warps and the device. That is finer than what Triton
specializes on (an int's being 1, a multiple of 16, its width), so a kept kernel is always the
one Triton would pick. A new key goes through `kernel[grid]` once (compiling, or finding
Triton's cache) and keeps what it returns. While Triton's launch hooks are set (its profiler),
launches go through the CompiledKernel's hook-calling path. Under TRITON_INTERPRET=1 there is
no compiled kernel: every call runs the interpreter.
"""

from __future__ import annotations

import torch
from triton import knobs
from triton.runtime.driver import driver

_MAX_KEYS = 4096  # a process that sees ever new shapes (inference) starts over past this


class Launcher:
    """`Launcher(kernel)(grid, *runtime_args, num_warps=w, **constexprs)` for a @triton.jit
    kernel whose constexpr parameters come after its runtime ones."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self._compiled: dict[tuple, tuple[object, tuple[str, ...]]] = {}
        self.last_compiled: object | None = None  # the CompiledKernel kept last (its registers, shared memory)

    def __call__(self, grid: tuple[int, ...], *args: object, num_warps: int, **constexprs: object) -> None:
        device = args[0].device.index
        key = (device, num_warps, *constexprs.items(),
               *[(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in args])
        entry = self._compiled.get(key)
        if entry is None:
            compiled = self.kernel[grid](*args, num_warps=num_warps, **constexprs)
            if hasattr(compiled, "packed_metadata"):  # a CompiledKernel (the interpreter returns none)
                if len(self._compiled) >= _MAX_KEYS:
                    self._compiled.clear()
                self._compiled[key] = (compiled, tuple(self.kernel.arg_names[len(args):]))
                self.last_compiled = compiled
            return
        compiled, constexpr_names = entry
        constants = [constexprs[name] for name in constexpr_names]
        grid3 = (*grid, 1, 1)[:3]
        if _hooks_set():
            compiled[grid3](*args, *constants)
        else:
            compiled.run(*grid3, driver.active.get_current_stream(device), compiled.function,
                         compiled.packed_metadata, None, None, None, *args, *constants)

    def cached(self) -> int:
        """How many keys launch directly (for tests)."""
        return len(self._compiled)


def _hooks_set() -> bool:
    runtime = knobs.runtime
    return any(getattr(hook, "calls", hook) for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook))
