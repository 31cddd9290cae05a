"""The h100 profile's fp8 run through the train stage (GPU with FP8 tensor cores): fp8_delayed on
backend scaled_mm, compiled, bf16. A preempted run resumes from its checkpoint with the amax
histories it kept (q/k/v and gate/up sharing one x history) and continues the uninterrupted
curve. Skipped without FP8 tensor cores."""

from __future__ import annotations

import json

import pytest
import torch
from train_testlib import losses, preempt_after

from contract.markers import read_marker
from stages.runtime import run_stage
from stages.train.core import run

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs FP8 tensor cores"
)
H100_FP8 = {"recipe": "fp8_delayed", "backend": "scaled_mm", "device": "cuda", "dtype": "bfloat16", "compile": True}


def test_fp8_delayed_on_scaled_mm_resumes_on_the_uninterrupted_curve(make_spec, monkeypatch) -> None:
    reference = make_spec("straight", **H100_FP8)
    assert run_stage(reference, run) == 0

    stop_preempting = preempt_after(monkeypatch, "preempted", after_step=3)
    spec = make_spec("preempted", checkpoint_every=2, **H100_FP8)
    assert run_stage(spec, run) == 143 and read_marker(spec.parent) is None
    stop_preempting()
    assert run_stage(spec, run) == 0

    straight, resumed = losses(reference.parent), losses(spec.parent)
    assert len(resumed) == len(straight) == 6 and straight[-1] < straight[0]
    # The same kernels on the same inputs, scaled from the same restored histories.
    assert resumed == pytest.approx(straight, rel=1e-6, abs=1e-6)
    precision = json.loads((spec.parent / "model" / "precision.json").read_text())
    assert (precision["backend"], precision["recipe"]["name"]) == ("scaled_mm", "fp8_delayed")
