"""Building blocks of the train loop: schedule, losses and the data order."""


import pytest
import torch
import torch.nn.functional as F

from stages.batches import StepPlan, TrainOrder
from stages.losses import cross_entropy_sum, kl_sum
from stages.runtime import StageInputError
from stages.train.schedule import lr_at


def test_warmup_then_cosine_to_min_lr() -> None:
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=2, steps=10)
    lrs = [lr_at(s, schedule="cosine", **kw) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert lrs[2 + 4] == pytest.approx(0.55)  # halfway through the decay
    assert lr_at(10, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(7, schedule="constant", **kw) == 1.0
    assert lr_at(6, schedule="linear", **kw) == pytest.approx(0.55)


def test_cross_entropy_sum_counts_only_shifted_label_tokens() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, 7]])
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="mean")
    n_tokens = int((labels[:, 1:] != -100).sum())
    assert n_tokens == 6
    assert cross_entropy_sum(logits, labels).item() == pytest.approx(expected.item() * n_tokens, rel=1e-6)


def test_split_batches_give_the_same_normalised_loss() -> None:
    """Sum-then-divide by the global token count is independent of how a batch is cut."""
    torch.manual_seed(1)
    logits = torch.randn(4, 6, 7)
    labels = torch.randint(0, 7, (4, 6))
    labels[0, :4] = -100  # rows with different numbers of label tokens
    whole = cross_entropy_sum(logits, labels) / (labels[:, 1:] != -100).sum()
    parts = sum(cross_entropy_sum(logits[i : i + 1], labels[i : i + 1]) for i in range(4))
    assert (parts / (labels[:, 1:] != -100).sum()).item() == pytest.approx(whole.item(), rel=1e-6)


def test_kl_is_zero_for_identical_logits_and_matches_modelopt_per_token() -> None:
    from modelopt.torch.distill.losses import LogitsDistillationLoss

    torch.manual_seed(2)
    student, teacher = torch.randn(1, 4, 9), torch.randn(1, 4, 9)
    labels = torch.tensor([[0, 1, 2, 3]])  # every shifted position is a label
    assert kl_sum(student, student, labels, temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)
    modelopt_per_token = LogitsDistillationLoss(temperature=2.0, reduction="none")(student[:, :-1], teacher[:, :-1])
    assert kl_sum(student, teacher, labels, 2.0).item() == pytest.approx(modelopt_per_token.sum().item(), rel=1e-5)


def test_one_and_two_processes_read_the_same_global_batch() -> None:
    order = TrainOrder(n_rows=10, seed=3)
    one = StepPlan(global_batch=4, micro_batch=1, world_size=1)
    two = StepPlan(global_batch=4, micro_batch=1, world_size=2)
    for step in range(4):  # crosses an epoch boundary at row 10
        single = sorted(i for mb in order.micro_batches(step, one, 0) for i in mb)
        split = sorted(i for r in (0, 1) for mb in order.micro_batches(step, two, r) for i in mb)
        assert single == split and len(single) == 4
    first_epoch = [order.row(i) for i in range(10)]
    assert sorted(first_epoch) == list(range(10))
    assert first_epoch == [TrainOrder(10, seed=3).row(i) for i in range(10)]  # a pure function of the seed
    assert two.accum_steps == 2


def test_indivisible_global_batch_is_one_line_error() -> None:
    with pytest.raises(StageInputError, match=r"params.global_batch: 6 is not a multiple of micro_batch \(2\) x world_size \(2\) = 4"):
        StepPlan(global_batch=6, micro_batch=2, world_size=2).check()


def test_mfu_counts_six_flops_per_parameter_and_token_over_all_devices() -> None:
    from stages.train.metrics import PEAK_BF16_FLOPS, mfu, peak_flops

    assert PEAK_BF16_FLOPS["H100"] == 989e12 and PEAK_BF16_FLOPS["B200"] == 2.25e15
    # Qwen3-8B-like: 8e9 params, 512 x 4096 tokens in 14 s on 8 B200s.
    tokens = 512 * 4096
    assert mfu(8_000_000_000, tokens, 14.0, 2.25e15, 8) == pytest.approx(6 * 8e9 * tokens / (2.25e15 * 8 * 14.0))
    assert mfu(1000, 10, 1.0, None, 1) is None  # unknown peak (CPU): no MFU rather than a wrong one
    assert peak_flops(torch.device("cpu")) is None


def test_packed_conversations_do_not_attend_across_their_boundary() -> None:
    """Packing puts several conversations in a row, position_ids restarting at each; the model
    must see each one alone (transformers builds a block-causal mask from the restarts when no
    cache is used, as the train and eval stages call it). A second conversation's logits are
    the same packed behind another one as alone."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(Path(__file__).parents[3] / "fixtures" / "models" / "tiny-qwen3",
                                                 dtype=torch.float32).eval()
    torch.manual_seed(0)
    first, second = torch.randint(0, 100, (1, 10)), torch.randint(0, 100, (1, 7))
    positions = torch.cat([torch.arange(10), torch.arange(7)]).unsqueeze(0)
    with torch.no_grad():
        packed = model(input_ids=torch.cat([first, second], 1), position_ids=positions, use_cache=False).logits
        alone = model(input_ids=second, position_ids=torch.arange(7).unsqueeze(0), use_cache=False).logits
    torch.testing.assert_close(packed[:, 10:], alone, rtol=0, atol=1e-5)
