"""Each stage kind's typed parameters: what the control plane validates once and the stage reads.

`<Kind>Params` is the user's config section; `<Kind>StageParams` (where it exists) adds what the
study graph sets per stage (the recipe by value, the model to start from, the report's rows).
"""

from __future__ import annotations

from contract.params.base import ExternalInput, StageParams
from contract.params.eval import EvalParams, EvalStageParams
from contract.params.export import ExportParams
from contract.params.preprocess import PreprocessParams
from contract.params.probe import ProbeParams
from contract.params.ptq import PtqParams, PtqStageParams
from contract.params.report import ReportInput, ReportParams, ReportStageParams
from contract.params.train import QadParams, TrainParams, TrainStageParams

# kind -> the model of the params its spec carries.
STAGE_PARAMS: dict[str, type[StageParams]] = {
    "preprocess": PreprocessParams,
    "train": TrainStageParams,
    "ptq": PtqStageParams,
    "export": ExportParams,
    "eval": EvalStageParams,
    "report": ReportStageParams,
    "probe": ProbeParams,
}

__all__ = [
    "STAGE_PARAMS", "EvalParams", "EvalStageParams", "ExportParams", "ExternalInput", "PreprocessParams",
    "ProbeParams", "PtqParams", "PtqStageParams", "QadParams", "ReportInput", "ReportParams",
    "ReportStageParams", "StageParams", "TrainParams", "TrainStageParams",
]
