"""Parameters of the `preprocess` stage (torch-free: the control plane validates configs with it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from contract.params.base import REVISION_DOC, ExternalInput, Revision, StageParams


class PreprocessParams(StageParams):
    """Chat SFT preprocessing: render rows with the tokenizer's chat template, mask all but the
    assistant tokens, split train/val by conversation, then pack or pad to `seq_len`."""

    source: str = Field(
        description="Dataset: a hub name (e.g. nvidia/OpenScience), a local dataset dir, or "
        "a .jsonl/.json/.parquet file or glob (JSON is read row by row; the rest with datasets)."
    )
    source_revision: Revision = Field(
        default=None,
        description=f"Hub revision of source: {REVISION_DOC}",
    )
    data_files: list[str] | None = Field(
        default=None,
        description="Files inside a hub/dir source to read (e.g. ['OS-Q3-235B-4.jsonl']); "
        "None reads the source's default files.",
    )
    split: str = Field(
        default="train", description="Split of a hub or saved-dataset source to read (local files are one split)."
    )
    tokenizer: str = Field(description="Tokenizer path or hub id; its chat template renders rows.")
    tokenizer_revision: Revision = Field(
        default=None,
        description="Hub revision of tokenizer (default: the study's model_revision when the tokenizer "
        f"is the model's): {REVISION_DOC}",
    )
    input_column: str = Field(default="input", description="Column with the user turn.")
    output_column: str = Field(default="output", description="Column with the assistant turn.")
    messages_column: str | None = Field(
        default=None,
        description="Column holding a chat list [{role, content}, ...]; when set it is used "
        "instead of input_column/output_column and every assistant turn is trained on.",
    )
    system_prompt: str | None = Field(
        default=None, description="System turn prepended to every chat that has none."
    )
    seq_len: int = Field(default=4096, ge=8, description="Tokens per output row (every row is exactly this long).")
    pack: bool = Field(
        default=True,
        description="Pack several conversations into one row (position_ids restart at each); "
        "false pads each conversation to seq_len.",
    )
    truncate: bool = Field(
        default=True,
        description="Conversations longer than seq_len are cut to seq_len (true) or dropped (false); "
        "both are counted in the manifest.",
    )
    val_fraction: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Fraction of conversations held out for validation."
    )
    seed: int = Field(default=1234, description="Seed of the train/val split.")
    max_rows: int | None = Field(
        default=None, ge=1, description="Read only the first max_rows rows of the source (smoke runs)."
    )
    num_proc: int = Field(default=1, ge=1, description="Worker processes for tokenization.")
    batch_size: int = Field(default=256, ge=1, description="Rows per tokenization batch.")
    on_bad_row: Literal["error", "skip"] = Field(
        default="error",
        description="A bad row (a line that is not UTF-8, not JSON or not an object; a missing, "
        "mistyped or empty column; no assistant tokens left after truncation): 'error' stops with "
        "the file and line; 'skip' counts and logs it.",
    )

    @model_validator(mode="after")
    def _columns_differ(self) -> PreprocessParams:
        if self.messages_column is None and self.input_column == self.output_column:
            raise ValueError("input_column and output_column must name different columns")
        return self

    def external_inputs(self) -> list[ExternalInput]:
        return [ExternalInput("source", self.source, self.source_revision),
                ExternalInput("tokenizer", self.tokenizer, self.tokenizer_revision)]
