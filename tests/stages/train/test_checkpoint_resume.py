"""Resume takes the newest checkpoint that loads completely; a broken one is named and set aside."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from train_testlib import losses, metric_rows, preempt_after

from stages.runtime import run_stage
from stages.train import checkpoint as ckpt
from stages.train.core import run
from stages.train.distributed import World

ONE_PROCESS = World(rank=0, world_size=1, device=torch.device("cpu"))


def test_a_truncated_newest_checkpoint_is_set_aside_and_training_resumes_from_the_one_before(
    make_spec, monkeypatch, caplog
) -> None:
    reference = make_spec("straight")
    assert run_stage(reference, run) == 0

    stop_preempting = preempt_after(monkeypatch, "preempted", after_step=3)
    spec = make_spec("preempted", checkpoint_every=2, keep_checkpoints=3)
    assert run_stage(spec, run) == 143
    stop_preempting()
    checkpoints = spec.parent / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2", "step-3"]

    shard = checkpoints / "step-3" / "__0_0.distcp"  # the case: the newest one cut in half
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])

    with caplog.at_level(logging.WARNING):
        assert run_stage(spec, run) == 0
    broken = [p for p in checkpoints.iterdir() if p.name.startswith(".broken-step-3-")]
    assert len(broken) == 1 and (broken[0] / "__0_0.distcp").stat().st_size == len(data) // 2  # kept, not deleted
    warnings = [r.getMessage() for r in caplog.records if "is broken" in r.getMessage()]
    assert warnings == [f"checkpoint {checkpoints / 'step-3'} is broken (__0_0.distcp: {len(data) // 2} bytes, "
                        f"its index needs {len(data)}); moved to {broken[0].name}, resuming from the one before"]
    # Steps 3..6 ran again from step 2's state: the curve of a run never interrupted, exactly.
    assert [r["step"] for r in metric_rows(spec.parent)] == [1, 2, 3, 4, 5, 6]
    assert losses(spec.parent) == losses(reference.parent)


def _save(stage_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> Path:
    state = ckpt.TrainState(step=step, scheduler={"last_epoch": step})
    return ckpt.save_checkpoint(stage_dir, state, model, optimizer, ONE_PROCESS, None, keep=5)


@pytest.mark.parametrize("damage", ["__0_0.distcp", "train_state.pt", ".metadata", "rng-0.pt:garbage"])
def test_a_missing_or_damaged_file_falls_back_one_checkpoint(tmp_path: Path, damage: str, caplog) -> None:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    _save(tmp_path, model, optimizer, step=2)
    at_step_2 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    newest = _save(tmp_path, model, optimizer, step=4)
    name, _, how = damage.partition(":")
    if how == "garbage":
        (newest / name).write_bytes(b"not a pickle")
    else:
        (newest / name).unlink()

    fresh = torch.nn.Linear(4, 3)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters())
    with caplog.at_level(logging.WARNING):
        resumed = ckpt.resume_newest(tmp_path, fresh, fresh_optimizer, ONE_PROCESS, logging.getLogger("t"))
    assert resumed is not None and resumed.path.name == "step-2" and resumed.state.step == 2
    assert torch.equal(fresh.weight, at_step_2)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step-2"]
    (message,) = [r.getMessage() for r in caplog.records if r.name == "t"]
    assert message.startswith(f"checkpoint {newest} is broken ({name}: ")


def test_no_loadable_checkpoint_starts_from_step_0(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    only = _save(tmp_path, model, optimizer, step=2)
    (only / "__0_0.distcp").write_bytes(b"")
    assert ckpt.resume_newest(tmp_path, model, optimizer, ONE_PROCESS, logging.getLogger("t")) is None
    assert ckpt.checkpoint_dirs(tmp_path) == [] and len(list((tmp_path / "checkpoints").iterdir())) == 1
