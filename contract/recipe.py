"""Precision recipes as data: which format each operand of each GEMM of a linear layer uses.

Torch-free on purpose: the control plane imports this to validate a user's config.

A linear layer runs three GEMMs (K is the reduction dimension that scaling blocks run along):
  fprop  y  = x  @ W^T   operands `input` (x), `weight` (W)            K = in_features
  dgrad  dx = dy @ W     operands `grad_output` (dy), `weight` (W)     K = out_features
  wgrad  dW = dy^T @ x   operands `grad_output` (dy), `input` (x)      K = tokens
YAML shorthand: `dgrad: mxfp8` means both operands of dgrad are mxfp8; `input: fp8_e4m3`
means an operand with that format and default scaling.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from contract.formats import (
    ELEMENT_FORMATS,
    INFERENCE_FORMATS,
    INT_FORMATS,
    PER_TENSOR_FORMATS,
)
from contract.validation import one_line

RECIPES_DIR = Path(__file__).with_name("recipes")

FORMATS = tuple(ELEMENT_FORMATS)
INFERENCE_FORMAT_NAMES = tuple(INFERENCE_FORMATS)
# Block sizes the hardware (and TE) use; a recipe may not change them (no backend runs others).
DEFAULT_BLOCK = {name: fmt.block_size for name, fmt in ELEMENT_FORMATS.items() if fmt.block_size}
DEFAULT_HIGH_PRECISION = ["lm_head", "*embed*"]


# Who implements a recipe (stages.precision.convert.BACKENDS has the same names, in this order):
# emulated = exact quantize-dequantize in PyTorch (any device), te = Transformer Engine,
# modelopt = ModelOpt fake quant (NVFP4 QAT baseline), torchao = TorchAO int QAT,
# scaled_mm = native FP8 GEMMs through torch._scaled_mm (Hopper and newer).
PrecisionBackend = Literal["emulated", "te", "modelopt", "torchao", "scaled_mm"]


class RecipeError(ValueError):
    """A recipe file or name is wrong; the message is one line naming the file and field."""


class OperandSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    format: str = Field("bf16", description=f"Element format, one of {', '.join(FORMATS)}.")
    scaling: Literal["current", "delayed"] = Field(
        "current",
        description="Per-tensor FP8 only: scale from this tensor's amax (current) or from an "
        "amax history of previous steps (delayed).",
    )
    amax_history_len: int = Field(1024, ge=1, description="Delayed scaling: steps of amax history.")
    amax_compute_algo: Literal["max", "most_recent"] = Field(
        "max", description="Delayed scaling: scale from the max of the history or its last entry."
    )
    block_size: int | None = Field(
        None, description="Elements per scale block along K (mx: 32, nvfp4: 16); null = default."
    )
    scale_rounding: Literal["rceil", "floor"] = Field(
        "rceil",
        description="MX only: how the E8M0 block scale is rounded (rceil = cuBLAS/TE, floor = OCP MX 1.0).",
    )
    stochastic_rounding: bool = Field(False, description="NVFP4 only: stochastic rounding of elements.")
    hadamard: bool = Field(
        False, description="NVFP4 only: random 16x16 Hadamard transform along K before quantizing."
    )
    block_2d: bool = Field(
        False, description="NVFP4 weights only: 16x16 scale blocks (same scales for W and W^T)."
    )
    nvfp4_arithmetic: Literal["torchao", "modelopt"] = Field(
        "torchao",
        description="NVFP4 only: the order of the scaling arithmetic. torchao: x * ((1/g)/s) with block "
        "scales floored at the smallest normal E4M3 (torchao's nvfp4_quantize, TE's NVFP4 recipe); "
        "modelopt: |x| / (s*g) with subnormal block scales, bit for bit ModelOpt's NVFP4 fake quant "
        "(1-D blocks, round to nearest even).",
    )
    group_size: int | None = Field(
        None, description="int4/int8 only: elements per scale group; null = one group per row (per token)."
    )
    symmetric: bool = Field(True, description="int4/int8 only: symmetric (no zero point) or asymmetric.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"format": value} if isinstance(value, str) else value

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in FORMATS:
            raise ValueError(f"'{value}' is not one of {', '.join(FORMATS)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> OperandSpec:
        fmt = self.format
        if self.scaling == "delayed" and fmt not in PER_TENSOR_FORMATS:
            raise ValueError(f"scaling 'delayed' needs a per-tensor format (fp8_e4m3, fp8_e5m2), not '{fmt}'")
        if self.block_size is not None and self.block_size != DEFAULT_BLOCK.get(fmt):
            expected = DEFAULT_BLOCK.get(fmt)
            raise ValueError(
                f"block_size {self.block_size} is not supported for '{fmt}'"
                + (f" (must be {expected})" if expected else " (only mx and nvfp4 formats have blocks)")
            )
        for flag in ("stochastic_rounding", "hadamard", "block_2d"):
            if getattr(self, flag) and fmt != "nvfp4":
                raise ValueError(f"{flag} is only supported for 'nvfp4', not '{fmt}'")
        if self.nvfp4_arithmetic != "torchao" and fmt != "nvfp4":
            raise ValueError(f"nvfp4_arithmetic is only for 'nvfp4', not '{fmt}'")
        if self.nvfp4_arithmetic == "modelopt":
            for flag in ("stochastic_rounding", "hadamard", "block_2d"):
                if getattr(self, flag):
                    raise ValueError(f"nvfp4_arithmetic 'modelopt' has no {flag} (ModelOpt's fake quant does not)")
        if self.group_size is not None and fmt not in INT_FORMATS:
            raise ValueError(f"group_size is only for int4/int8, not '{fmt}'")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        return self

    @property
    def quantized(self) -> bool:
        return self.format != "bf16"

    @property
    def block(self) -> int | None:
        return DEFAULT_BLOCK.get(self.format)

    @property
    def scale_format(self) -> str | None:
        """e8m0 (MX), e4m3_fp32 (NVFP4: E4M3 block scales times one FP32 global scale), fp32 otherwise."""
        return ELEMENT_FORMATS[self.format].scale


def _operand_pair(first: str, second: str) -> Any:
    """A GEMM's `before` validator: a bare format or operand dict applies to both operands
    (a GEMM-level key such as fast_accumulation in that dict stays with the GEMM)."""

    def expand(value: Any) -> Any:
        if isinstance(value, str):
            return {first: value, second: value}
        if isinstance(value, dict) and "format" in value:
            gemm = {k: v for k, v in value.items() if k in GEMM_FIELDS}
            operand = {k: v for k, v in value.items() if k not in GEMM_FIELDS}
            return {first: operand, second: operand, **gemm}
        return value

    return expand


# The operands of each GEMM, in order; the other fields of a GEMM spec are GEMM_FIELDS.
GEMM_OPERANDS = {"fprop": ("input", "weight"), "dgrad": ("grad_output", "weight"), "wgrad": ("grad_output", "input")}
GEMM_FIELDS = ("fast_accumulation",)


def _fast_accumulation() -> Any:
    return Field(
        False,
        description="Per-tensor FP8 GEMMs on Hopper: accumulate in the tensor cores' own precision without "
        "promoting partial sums to FP32 (faster, less exact; torch._scaled_mm use_fast_accum, Transformer "
        "Engine's use_split_accumulator=False, which TE's FP8 recipes use for fprop).",
    )


class FpropSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    input: OperandSpec = Field(default_factory=OperandSpec, description="Activation x.")
    weight: OperandSpec = Field(default_factory=OperandSpec, description="Weight W.")
    fast_accumulation: bool = _fast_accumulation()

    @model_validator(mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        return _operand_pair("input", "weight")(value)


class DgradSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    grad_output: OperandSpec = Field(default_factory=OperandSpec, description="Output gradient dy.")
    weight: OperandSpec = Field(default_factory=OperandSpec, description="Weight W.")
    fast_accumulation: bool = _fast_accumulation()

    @model_validator(mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        return _operand_pair("grad_output", "weight")(value)


class WgradSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    grad_output: OperandSpec = Field(default_factory=OperandSpec, description="Output gradient dy.")
    input: OperandSpec = Field(default_factory=OperandSpec, description="Activation x.")
    fast_accumulation: bool = _fast_accumulation()

    @model_validator(mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        return _operand_pair("grad_output", "input")(value)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(description="Recipe name (recorded as the MLflow tag `recipe`).")
    description: str = Field("", description="One line for humans.")
    fprop: FpropSpec = Field(default_factory=FpropSpec, description="Forward GEMM y = x W^T.")
    dgrad: DgradSpec = Field(default_factory=DgradSpec, description="Input-gradient GEMM dx = dy W.")
    wgrad: WgradSpec = Field(default_factory=WgradSpec, description="Weight-gradient GEMM dW = dy^T x.")
    backward_source: Literal["original", "forward_quantized"] = Field(
        "original",
        description="original: each backward operand is quantized from the high-precision tensor "
        "(Transformer Engine); forward_quantized: backward reuses the fake-quantized forward "
        "tensors, straight-through gradients (QAT).",
    )
    high_precision: list[str] = Field(
        default_factory=lambda: list(DEFAULT_HIGH_PRECISION),
        description="fnmatch globs on module names that stay high precision (never converted).",
    )
    fake_quant_after_steps: int = Field(
        0, ge=0, description="QAT: optimizer steps that run unquantized before fake quant starts."
    )
    inference_format: str = Field(
        "bf16", description=f"What the exported model deploys as, one of {', '.join(INFERENCE_FORMAT_NAMES)}."
    )

    @field_validator("inference_format")
    @classmethod
    def _known_inference_format(cls, value: str) -> str:
        if value not in INFERENCE_FORMATS:
            raise ValueError(f"'{value}' is not one of {', '.join(INFERENCE_FORMAT_NAMES)}")
        return value

    @model_validator(mode="after")
    def _int_formats_are_qat(self) -> Recipe:
        uses_int = any(op.format in INT_FORMATS for _, op in self.operands())
        if uses_int and self.backward_source != "forward_quantized":
            raise ValueError("int4/int8 formats are QAT fake quant: set backward_source: forward_quantized")
        if uses_int and any(op.format in INT_FORMATS for gemm, op in self.operands() if gemm[0] != "fprop"):
            raise ValueError("int4/int8 formats are only supported in fprop")
        return self

    @model_validator(mode="after")
    def _rotations_and_2d_blocks(self) -> Recipe:
        for (gemm, operand), spec in self.operands():
            if spec.hadamard and gemm != "wgrad":
                raise ValueError(f"{gemm}.{operand}.hadamard: the Hadamard transform is only for wgrad operands")
            if spec.block_2d and operand != "weight":
                raise ValueError(f"{gemm}.{operand}.block_2d: 16x16 blocks are only for weight operands")
        if self.wgrad.grad_output.hadamard != self.wgrad.input.hadamard:
            raise ValueError("wgrad.hadamard: set it on both grad_output and input (the rotations must cancel)")
        return self

    @model_validator(mode="after")
    def _fast_accumulation_is_per_tensor_fp8(self) -> Recipe:
        for gemm_name, operands in GEMM_OPERANDS.items():
            gemm = getattr(self, gemm_name)
            if gemm.fast_accumulation and any(getattr(gemm, op).format not in PER_TENSOR_FORMATS for op in operands):
                raise ValueError(
                    f"{gemm_name}.fast_accumulation: only for GEMMs of per-tensor FP8 operands "
                    f"({', '.join(PER_TENSOR_FORMATS)})"
                )
        return self

    def operands(self) -> list[tuple[tuple[str, str], OperandSpec]]:
        """((gemm, operand), spec) for all six operands, in a fixed order."""
        return [((gemm, op), getattr(getattr(self, gemm), op)) for gemm, ops in GEMM_OPERANDS.items() for op in ops]

    def gemm_summary(self) -> str:
        """One line for humans and tags: `fprop=nvfp4,nvfp4 dgrad=mxfp8,mxfp8 wgrad=mxfp8,mxfp8 (original)`;
        a GEMM with fast accumulation reads `fprop=fp8_e4m3,fp8_e4m3+fast_accumulation`."""
        parts = []
        for gemm_name, operands in GEMM_OPERANDS.items():
            gemm = getattr(self, gemm_name)
            fast = "+fast_accumulation" if gemm.fast_accumulation else ""
            parts.append(f"{gemm_name}=" + ",".join(getattr(gemm, op).format for op in operands) + fast)
        return " ".join(parts) + f" ({self.backward_source})"

    @property
    def formats(self) -> set[str]:
        return {op.format for _, op in self.operands()}

    @property
    def is_high_precision(self) -> bool:
        return self.formats == {"bf16"}

    @property
    def uses_delayed_scaling(self) -> bool:
        return any(op.scaling == "delayed" for _, op in self.operands())


def builtin_recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _one_line(error: ValidationError) -> str:
    text = one_line(error)
    # A shorthand (`fprop: nvfp5`) repeats one mistake per operand: count distinct messages only.
    distinct = len({e["msg"] for e in error.errors()})
    return f"{text} (and {distinct - 1} more)" if distinct > 1 else text


def parse_recipe(data: Any, source: str) -> Recipe:
    """Validates a recipe dict; `source` names it in errors (a file name or `builtin <name>`)."""
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(f"recipe {source}: {_one_line(error)}") from None


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a YAML file path (a user recipe)."""
    if "/" not in name_or_path and not name_or_path.endswith((".yaml", ".yml")):
        if name_or_path not in builtin_recipe_names():
            raise RecipeError(
                f"recipe {name_or_path}: no such built-in recipe; choose one of "
                f"{', '.join(builtin_recipe_names())} or give a YAML file path"
            )
        return _builtin_recipe(name_or_path)
    path = Path(name_or_path)
    try:  # a NUL byte or a name longer than the OS takes is no file either
        is_file = path.is_file()
    except (OSError, ValueError):
        is_file = False
    if not is_file:
        raise RecipeError(f"recipe {name_or_path}: file not found")
    return _read_recipe(path, name_or_path)


@functools.cache
def _builtin_recipe(name: str) -> Recipe:
    # Read once per process: a Recipe is frozen, so every field that names it shares one value
    # (a study's `bf16` run and its eval-base stage hold the same object).
    return _read_recipe(RECIPES_DIR / f"{name}.yaml", name)


def _read_recipe(path: Path, name_or_path: str) -> Recipe:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise RecipeError(f"recipe {name_or_path}:{where} {problem}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"recipe {name_or_path}: cannot read: {error}") from None
    except RecursionError:
        raise RecipeError(f"recipe {name_or_path}: nested too deeply") from None
    if isinstance(data, dict):
        data.setdefault("name", path.stem)  # a user recipe is named after its file by default
    return parse_recipe(data, name_or_path)


def recipe_from(value: Any) -> Any:
    """A recipe field's input as the recipe itself: a built-in name or a YAML path is loaded, a
    mapping is validated; a Recipe passes. The one place a named recipe becomes a value."""
    try:
        if isinstance(value, str):
            return load_recipe(value)
        if isinstance(value, dict):
            return parse_recipe(value, "given inline")
    except RecipeError as error:
        raise ValueError(str(error)) from None
    return value


# A recipe field: given by name, path or mapping; held, dumped and fingerprinted by value.
RecipeValue = Annotated[Recipe, BeforeValidator(recipe_from)]
