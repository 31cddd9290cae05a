"""On a GPU: ModelOpt's exporter and our packer write the same NVFP4 checkpoint, byte for byte.

The chain is the study's: ptq with backend modelopt (mtq.quantize NVFP4_DEFAULT_CFG on CUDA),
then export twice from that dir, packer modelopt (export_hf_checkpoint on the restored
quantizers) and packer ours (our packer on the recorded amax)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages.runtime import run_stage
from tests.stages.ptq.quant_testkit import TINY_MODEL, stage_spec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="ModelOpt's NVFP4 quantizers run only on CUDA")


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_modelopt_and_our_packer_write_the_same_nvfp4_bytes(tmp_path: Path, data_dir: Path) -> None:
    from safetensors.torch import load_file

    from stages.export.core import run as export
    from stages.ptq.core import run as ptq

    params = {"recipe": "nvfp4_qat", "backend": "modelopt", "model": str(TINY_MODEL), "calib_samples": 8, "device": "cuda"}
    assert run_stage(stage_spec(tmp_path / "ptq", "ptq", {"data": data_dir}, params), ptq) == 0
    for packer in ("modelopt", "ours"):
        spec = stage_spec(tmp_path / packer, "export", {"model": tmp_path / "ptq"}, {"packer": packer, "bf16_checkpoint": False})
        assert run_stage(spec, export) == 0
        assert json.loads((tmp_path / packer / "export.json").read_text())["packer"] == packer
    theirs_dir, ours_dir = tmp_path / "modelopt" / "quantized", tmp_path / "ours" / "quantized"
    theirs, ours = load_file(str(theirs_dir / "model.safetensors")), load_file(str(ours_dir / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    differing = {key: (ours[key].reshape(-1)[:2].tolist(), theirs[key].reshape(-1)[:2].tolist())
                 for key in sorted(theirs) if not _same_tensor(ours[key], theirs[key])}
    assert differing == {}
    for name in ("hf_quant_config.json", "config.json"):
        assert json.loads((ours_dir / name).read_text()) == json.loads((theirs_dir / name).read_text()), name


def test_auto_packer_picks_modelopt_for_a_modelopt_quantized_model(tmp_path: Path, data_dir: Path) -> None:
    from stages.export.core import run as export
    from stages.ptq.core import run as ptq

    params = {"recipe": "nvfp4_qat", "backend": "modelopt", "model": str(TINY_MODEL), "calib_samples": 4, "device": "cuda"}
    assert run_stage(stage_spec(tmp_path / "ptq", "ptq", {"data": data_dir}, params), ptq) == 0
    assert run_stage(stage_spec(tmp_path / "export", "export", {"model": tmp_path / "ptq"}, {}), export) == 0
    assert json.loads((tmp_path / "export" / "export.json").read_text())["packer"] == "modelopt"
