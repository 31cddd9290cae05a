"""Parameters of the `export` stage: deployable checkpoints of a trained model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from contract.params.base import StageParams


class ExportParams(StageParams):
    bf16_checkpoint: bool = Field(
        True, description="Write a bf16 Hugging Face checkpoint (every run gets one)."
    )
    quantized_checkpoint: bool = Field(
        True,
        description="For quantized recipes also write ModelOpt's unified HF format "
        "(packed weights + scales, hf_quant_config.json).",
    )
    packer: Literal["auto", "modelopt", "ours"] = Field(
        "auto",
        description="Who packs the quantized checkpoint: ModelOpt's exporter (GPU), our packer "
        "(anywhere), or auto = modelopt where it runs, ours otherwise (recorded).",
    )
    calib_samples: int = Field(
        16,
        ge=1,
        description="When the model dir holds no calibrated input amax (SFT/TE runs) and the stage "
        "has a 'data' input: training sequences used to calibrate the activations' input_scale.",
    )
