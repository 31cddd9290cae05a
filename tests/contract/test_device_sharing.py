"""What a train stage records about who shared its device, from the placer's own record."""

from __future__ import annotations

import os

import pytest

from contract.device_sharing import (
    LEDGER_ENV,
    PlacementLedger,
    record_sharing,
    shared_during,
    sharing_from_ledger,
    steps_window,
)


@pytest.fixture
def ledger(tmp_path):
    ledger = PlacementLedger(tmp_path / "placements.jsonl")
    ledger.started("preprocess", "preprocess", [], at=0.0)
    ledger.ended("preprocess", at=10.0)
    ledger.started("train-bf16", "train", [0], at=10.0)
    ledger.started("train-fp8", "train", [1], at=10.0)
    ledger.started("eval-base", "eval", [0], at=12.0)
    ledger.ended("eval-base", at=30.0)
    ledger.ended("train-fp8", at=50.0)
    ledger.ended("train-bf16", at=60.0)
    return ledger


def test_a_stage_on_the_same_gpu_shares_the_gpu_and_any_other_shares_the_cpu_cores(ledger):
    record = sharing_from_ledger(ledger, "train-bf16", (20.0, 55.0))
    assert (record["source"], record["device"], record["exclusive"]) == ("local driver", "gpu 0", False)
    assert record["shared_with"] == [
        {"stage": "train-fp8", "kind": "train", "on": "cpu cores", "from": 20.0, "until": 50.0},
        {"stage": "eval-base", "kind": "eval", "on": "gpu 0", "from": 20.0, "until": 30.0},
    ]
    # The report asks about the steps it averages: only the fp8 run overlaps 40-55 s.
    assert [e["stage"] for e in shared_during(record, (40.0, 55.0))] == ["train-fp8"]


def test_a_stage_that_ran_alone_during_its_steps_is_exclusive(ledger):
    ledger.started("train-mxfp8", "train", [0], at=70.0)
    record = sharing_from_ledger(ledger, "train-mxfp8", (75.0, 90.0))  # still running: no end yet
    assert (record["exclusive"], record["shared_with"]) == (True, [])


def test_a_restart_without_an_end_closes_the_earlier_attempt(tmp_path):
    ledger = PlacementLedger(tmp_path / "placements.jsonl")
    ledger.started("eval-base", "eval", [], at=0.0)  # its driver was killed: no end written
    ledger.started("eval-base", "eval", [], at=100.0)
    ledger.ended("eval-base", at=110.0)
    assert [(p.started_at, p.ended_at) for p in ledger.placements()] == [(0.0, 100.0), (100.0, 110.0)]


def test_the_train_stage_finds_the_drivers_record_through_the_environment(ledger, monkeypatch):
    monkeypatch.setenv(LEDGER_ENV, str(ledger.path))
    assert record_sharing("train-fp8", (20.0, 45.0), on_gpu=True)["shared_with"][0]["stage"] == "train-bf16"


def test_slurm_gpus_belong_to_the_job_and_unbound_cpu_cores_are_unknown(monkeypatch):
    for name in (LEDGER_ENV, "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_JOB_GPUS", "0,1,2,3,4,5,6,7")
    gpu = record_sharing("train-bf16", (0.0, 1.0), on_gpu=True)
    assert (gpu["source"], gpu["exclusive"], gpu["device"]) == ("slurm job 42", True, "gpu 0,1,2,3,4,5,6,7")
    cpu = record_sharing("train-bf16", (0.0, 1.0), on_gpu=False)
    bound = len(os.sched_getaffinity(0)) < (os.cpu_count() or 0)
    assert cpu["exclusive"] is (True if bound else None)


def test_without_a_driver_or_scheduler_nothing_is_claimed(monkeypatch):
    for name in (LEDGER_ENV, "SLURM_JOB_ID", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)
    record = record_sharing("train-bf16", (0.0, 1.0), on_gpu=False)
    assert (record["source"], record["exclusive"]) == ("none", None)


def test_steps_window_runs_from_the_first_steps_start_to_the_last_steps_end():
    rows = [{"step": 1, "step_time_s": 2.0, "ended_at": 102.0}, {"step": 2, "step_time_s": 1.0, "ended_at": 104.0}]
    assert steps_window(rows) == (100.0, 104.0)
    assert steps_window([{"step": 1, "loss": 3.0}]) is None
