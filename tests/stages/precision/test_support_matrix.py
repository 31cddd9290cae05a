"""`python -m stages.precision`: what trains on this machine, tried for real, and why not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages.precision.__main__ import main

FP8_QAT = Path(__file__).resolve().parents[3] / "fixtures" / "recipes" / "fp8_qat.yaml"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's answers")
def test_the_cpu_matrix_names_what_runs_and_why_the_rest_does_not(capsys) -> None:
    assert main(["fp8", "int8_dyn_act_int4_weight", str(FP8_QAT), "--json"]) == 0
    matrix = json.loads(capsys.readouterr().out)
    runs = {name: sorted(b for b, why in cells.items() if why is None) for name, cells in matrix.items()}
    assert runs == {"fp8": ["emulated"], "int8_dyn_act_int4_weight": ["torchao"], "fp8_qat": ["emulated", "modelopt"]}
    assert matrix["fp8"]["scaled_mm"] == (
        "backend scaled_mm needs a CUDA GPU with FP8 tensor cores (sm_89+); choose backend emulated"
    )
    assert matrix["int8_dyn_act_int4_weight"]["emulated"] == (
        "recipe int8_dyn_act_int4_weight: backend emulated does not implement int4, int8 fake quant; choose backend torchao"
    )
    assert all(why is None or why.startswith(("recipe ", "backend ")) and "choose backend" in why
               for cells in matrix.values() for why in cells.values())


def test_an_unknown_recipe_is_one_line_and_exit_2(capsys) -> None:
    assert main(["fp3"]) == 2
    assert capsys.readouterr().err == (
        "recipes: recipe fp3: no such built-in recipe; choose one of bf16, fp8, fp8_delayed, int4_weight_only, "
        "int8_dyn_act_int4_weight, mxfp8, nv4f_mx8b, nvfp4_qat or give a YAML file path\n"
    )
