"""The plots and the one-page HTML report, drawn from stage folders of a small study."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

import matplotlib.pyplot as plt
import pytest

from stages.report.html import StageRecord, to_html
from stages.report.plots import PLOT_FILES, colours_for, draw_plots, loss_curves_figure
from stages.report.rows import Settings, build_study, read_summary
from tests.stages.report.report_fixtures import small_study


@pytest.fixture
def study_and_inputs(tmp_path: Path):
    inputs, tags = small_study(tmp_path / "stages")
    return build_study(inputs, tags, Settings(baseline="bf16", skip_first_steps=1)), inputs, tags


def test_loss_curves_put_cross_entropy_of_every_run_on_one_axis_and_qad_kl_on_its_own(study_and_inputs):
    study, _, _ = study_and_inputs
    figure = loss_curves_figure(study.curves, colours_for(sorted(study.curves)))
    train_ax, _, kl_ax = figure.axes
    curves = {line.get_label(): list(line.get_ydata()) for line in train_ax.lines}
    assert sorted(curves) == ["bf16", "fp8", "int4", "qat"]
    assert curves["qat"] == [row["ce_loss"] for row in study.curves["qat"]]  # its CE term, not the KL mix
    assert [line.get_label() for line in kl_ax.lines] == ["qat"]
    assert all("nats/token" in ax.get_ylabel() for ax in figure.axes)
    # The legend sits below the panels: it covers none of them.
    figure.canvas.draw()
    legend_box = figure.legends[0].get_window_extent()
    assert not any(legend_box.overlaps(ax.get_window_extent()) for ax in figure.axes)
    plt.close(figure)


def test_the_html_report_is_one_offline_page_with_table_plots_settings_and_versions(study_and_inputs, tmp_path):
    study, inputs, tags = study_and_inputs
    plots = draw_plots(study, tmp_path / "plots")
    assert [p.name for p in plots] == list(PLOT_FILES)
    records = [StageRecord(role, role.split("-")[0], "f" * 64, {"lr": 0.003, "recipe": tags[role]["recipe"]},
                           tags[role], read_summary(path)) for role, path in inputs.items()]
    page = to_html(study, "Study t", "what it asks", plots, records, {"baseline_run": "bf16"}, {"numpy": "2.4.6"})

    checker = _TagBalance()
    checker.feed(page)
    assert checker.unclosed == [] and checker.tables == 5  # study, train and eval settings, stages, versions
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert [base64.b64decode(data) for data in images] == [p.read_bytes() for p in plots]  # inline, byte for byte
    assert not re.search(r"(src|href)=['\"]?https?:", page)  # nothing fetched from anywhere
    assert "<td class='flag-nc'>0.500x [0.452, 0.552], not comparable</td>" in page
    assert "within noise</td>" in page
    assert "&quot;lr&quot;: 0.003" in page  # the train stages' common settings
    assert "<td>torch</td><td>2.13.0</td><td>eval-base, eval-bf16," in page
    assert "<td>numpy</td><td>2.4.6</td><td>report</td>" in page


class _TagBalance(HTMLParser):
    VOID: ClassVar[set[str]] = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.unclosed: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.unclosed.append(tag)
        self.tables += tag == "table"

    def handle_endtag(self, tag):
        assert self.unclosed and self.unclosed[-1] == tag, (tag, self.unclosed[-5:])
        self.unclosed.pop()
