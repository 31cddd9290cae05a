"""`python -m pipeline report` shows a report only when the cache would keep it: made for this
run's fingerprint, with every output as it was written. Otherwise one line says why (exit 1)."""

from __future__ import annotations

from pathlib import Path

from contract.markers import mark_failed, mark_succeeded
from pipeline.cli import main
from pipeline.layout import RunLayout
from pipeline.run_record import RunRecord, StageRecord, write_record

RUN = "study"
FINGERPRINT = "f" * 64


def report_run(root: Path) -> Path:
    """A run whose report stage wrote its table and succeeded for the run's fingerprint."""
    layout = RunLayout(root, RUN)
    layout.run_dir.mkdir(parents=True)
    write_record(layout.run_file, RunRecord(run_id=RUN, cluster="local", created_at=1.0, stages={
        "report": StageRecord(kind="report", fingerprint=FINGERPRINT, image="faster-qat-cpu:dev")}))
    stage = layout.stage_dir("report")
    stage.mkdir()
    (stage / "report.md").write_text("| run | val loss |\n| bf16 | 0.576 |\n")
    mark_succeeded(stage, FINGERPRINT)
    return stage


def report(root: Path, capsys) -> tuple[int, str, str]:
    code = main(["report", RUN, "--root", str(root)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_verified_report_is_printed(tmp_path, capsys):
    report_run(tmp_path)
    code, out, err = report(tmp_path, capsys)
    assert (code, err) == (0, "") and out.startswith("| run | val loss |\n| bf16 | 0.576 |\n")


def test_a_report_with_a_changed_or_missing_output_is_said_not_printed(tmp_path, capsys):
    stage = report_run(tmp_path)
    (stage / "report.md").write_text("| run | val loss |\n| bf16 | 0.1 |\n")  # edited after the stage
    code, out, err = report(tmp_path, capsys)
    assert code == 1 and out == ""
    assert err == (f"error: {RUN}: no report to show: the report stage's output report.md has 34 bytes, 36 were "
                   f"recorded (the next run remakes it); see `python -m pipeline status {RUN}`\n")
    (stage / "report.md").unlink()
    code, out, err = report(tmp_path, capsys)
    assert code == 1 and out == "" and "the report stage's output report.md is missing" in err


def test_a_report_of_an_earlier_config_is_stale(tmp_path, capsys):
    stage = report_run(tmp_path)
    mark_succeeded(stage, "e" * 64)  # made for other inputs than the run's record names
    code, out, err = report(tmp_path, capsys)
    assert code == 1 and out == ""
    assert err == (f"error: {RUN}: no report to show: the report there is stale (its inputs or parameters "
                   f"changed since it was made; the next run remakes it); see `python -m pipeline status {RUN}`\n")


def test_a_failed_or_missing_report_stage_is_said(tmp_path, capsys):
    stage = report_run(tmp_path)
    (stage / "_SUCCESS").unlink()
    code, _, err = report(tmp_path, capsys)
    assert code == 1 and "no report to show: the report stage has not run yet;" in err
    mark_failed(stage, FINGERPRINT, "report: boom")
    code, _, err = report(tmp_path, capsys)
    assert code == 1 and "no report to show: the report stage failed;" in err
