"""The local driver records where each stage ran and, with report.timing: isolated, runs timed
stages alone: real subprocesses (probe stages), the driver's own ledger."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest

from contract.device_sharing import LEDGER_FILE, PlacementLedger, sharing_from_ledger
from pipeline.backends.local import LocalBackend
from pipeline.backends.local_driver import LocalDriver
from pipeline.backends.local_settings import LocalSettings
from pipeline.backends.local_timing import LocalTiming
from pipeline.loader import load_config
from tests.pipeline.probe_dag import drive, fan_out_graph, prepare


def spans(root) -> dict[str, tuple[float, float]]:
    return {p.stage: (p.started_at, p.ended_at) for p in PlacementLedger(root / "probe" / LEDGER_FILE).placements()}


def test_the_driver_records_every_stage_and_branches_that_overlap_share_the_cpu(tmp_path):
    drive(fan_out_graph(sleep_s=1.0), tmp_path, max_parallel=4)
    ran = spans(tmp_path)
    assert sorted(ran) == ["a", "b", "c", "d", "join", "source"]
    jobs = json.loads((tmp_path / "probe" / "jobs.json").read_text())["stages"]
    for name, (start, end) in ran.items():  # the same times the driver shows in `status`
        assert start == pytest.approx(jobs[name]["started_at"], abs=0.5) and end >= start
    a_start, a_end = ran["a"]
    record = sharing_from_ledger(PlacementLedger(tmp_path / "probe" / LEDGER_FILE), "a", (a_start + 0.2, a_end - 0.2))
    assert record["exclusive"] is False
    assert sorted(e["stage"] for e in record["shared_with"]) == ["b", "c", "d"]
    assert {e["on"] for e in record["shared_with"]} == {"cpu cores"}


def test_isolated_timing_runs_each_timed_stage_alone(tmp_path):
    prepared = prepare(fan_out_graph(sleep_s=0.4), tmp_path)
    timing = LocalTiming(prepared.layout.run_dir, isolated=True, timed_kinds=("probe",))
    states = LocalDriver(prepared.layout, prepared.record, LocalSettings(), [], timing=timing).run()
    assert {state.value for state in states.values()} == {"succeeded"}
    ordered = sorted(spans(tmp_path).values())
    for (_, end), (start, _) in pairwise(ordered):
        assert start >= end  # no two stages ever overlapped
    ledger = PlacementLedger(tmp_path / "probe" / LEDGER_FILE)
    b_start, b_end = spans(tmp_path)["b"]
    assert sharing_from_ledger(ledger, "b", (b_start, b_end))["exclusive"] is True


def test_isolation_lets_nothing_run_beside_a_train_stage_nor_start_ahead_of_a_waiting_one(tmp_path):
    timing = LocalTiming(tmp_path, isolated=True)
    assert timing.may_start("train", [], timed_waiting=True)
    assert not timing.may_start("train", ["eval"], timed_waiting=True)  # waits for the eval to finish
    assert not timing.may_start("eval", ["train"], timed_waiting=False)
    assert not timing.may_start("eval", [], timed_waiting=True)  # the waiting train stage goes first
    assert timing.may_start("eval", ["eval", "export"], timed_waiting=False)
    shared = LocalTiming(tmp_path)
    assert shared.may_start("eval", ["train"], timed_waiting=True)


def test_report_timing_in_the_config_reaches_the_driver():
    def timing(*args: str) -> str:
        return LocalBackend.settings_from(load_config(*args).config, {}).timing

    assert timing("smoke") == "shared"
    assert timing("smoke", ["report.timing=isolated"]) == "isolated"
    assert timing("h100") == timing("qwen3-8b-b200") == "isolated"
