"""causal_lm_logits: the logits transformers computes, with the attention masks made from what the
host knows (Batch.packed) instead of transformers reading a device tensor back in every forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stages.batches import Batch, sequence_breaks
from stages.hf_model import causal_lm_logits, load_causal_lm

TINY_MODEL = Path(__file__).resolve().parents[2] / "fixtures" / "models" / "tiny-qwen3"
T = 24


def batch(*position_rows: list[int]) -> Batch:
    positions = torch.tensor(position_rows)
    ids = torch.randint(10, 200, positions.shape, generator=torch.Generator().manual_seed(3))
    return Batch(ids, ids.clone(), positions, packed=bool(sequence_breaks(positions).any()))


UNPACKED = batch(list(range(T)), list(range(T)))
PACKED = batch(list(range(T)), list(range(10)) + list(range(T - 10)))  # the second row holds two sequences


def transformers_logits(model: torch.nn.Module, b: Batch) -> torch.Tensor:
    return model(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False).logits


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("b", [UNPACKED, PACKED], ids=["unpacked", "packed"])
def test_logits_are_transformers_bits(attention: str, b: Batch) -> None:
    model = load_causal_lm(TINY_MODEL, "float32", "model")
    model.set_attn_implementation(attention)
    with torch.no_grad():
        assert torch.equal(causal_lm_logits(model, b), transformers_logits(model, b))


def test_a_packed_row_attends_within_its_own_sequences() -> None:
    model = load_causal_lm(TINY_MODEL, "float32", "model")
    with torch.no_grad():
        packed, as_one = causal_lm_logits(model, PACKED), causal_lm_logits(model, batch(list(range(T)), list(range(T))))
    assert torch.equal(packed[0], as_one[0])
    assert torch.equal(packed[1, :10], as_one[1, :10]) and not torch.allclose(packed[1, 10:], as_one[1, 10:])


def test_the_forward_reads_nothing_back_from_the_device(monkeypatch) -> None:
    """transformers' packed-rows check is where the read happens; with sdpa it is never reached."""
    from transformers import masking_utils

    def read_back(*args, **kwargs):
        raise AssertionError("find_packed_sequence_indices reads a device tensor on the host")

    model = load_causal_lm(TINY_MODEL, "float32", "model")
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", read_back)
    with torch.no_grad():
        for b in (UNPACKED, PACKED):
            causal_lm_logits(model, b)
        with pytest.raises(AssertionError, match="reads a device tensor"):
            transformers_logits(model, UNPACKED)


def test_sequence_breaks_mark_where_positions_restart() -> None:
    breaks = sequence_breaks(torch.tensor([[0, 1, 2, 0, 1], [5, 6, 7, 8, 9]]))
    assert breaks.tolist() == [[False, False, False, True, False], [False] * 5]
