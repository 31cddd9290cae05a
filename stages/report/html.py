"""The one-page HTML report: the table, the plots, and the settings and versions behind them.

One file, readable offline: plots are inlined as data: URIs and the style sheet is in the page.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.report.rows import Study
from stages.report.table import NOT_COMPARABLE, WITHIN_NOISE, columns, notes, pct_cell

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1500px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.flag-noise { background: #fff8e1; }
td.flag-nc { background: #fdecea; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
details { margin: 0.3em 0; } pre { background: #f7f7f7; padding: 0.5em; overflow-x: auto; font-size: 12px; }
.legend span { padding: 0 6px; margin-right: 1em; }
"""


@dataclass(frozen=True)
class StageRecord:
    """What produced one input of the report: its spec and its summary."""

    stage: str
    kind: str
    fingerprint: str
    params: dict[str, Any]
    tags: dict[str, str]
    summary: dict[str, Any]


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _table(study: Study) -> str:
    cols = columns(study)
    head = "".join(f"<th>{_esc(col.header)}</th>" for col in cols)
    body = []
    for i in range(len(study.rows)):
        cells = []
        for col in cols:
            text = col.cells[i]
            flag = " class='flag-nc'" if NOT_COMPARABLE in text else " class='flag-noise'" if WITHIN_NOISE in text else ""
            cells.append(f"<td{flag}>{_esc(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<figure><img alt='{_esc(path.stem)}' src='data:image/png;base64,{data}'><figcaption>{_esc(path.name)}</figcaption></figure>"


def _shared_and_varying(records: list[StageRecord]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Params equal in every record, and per stage the ones that differ."""
    if not records:
        return {}, {}
    keys = set().union(*(record.params for record in records))
    shared = {k: records[0].params.get(k) for k in sorted(keys)
              if all(json.dumps(r.params.get(k), sort_keys=True) == json.dumps(records[0].params.get(k), sort_keys=True)
                     for r in records)}
    varying = {r.stage: {k: r.params.get(k) for k in sorted(keys) if k not in shared} for r in records}
    return shared, varying


def _settings(records: list[StageRecord], report_params: Mapping[str, Any]) -> str:
    parts = ["<h2>Configuration that produced these numbers</h2>"]
    for kind in ("train", "eval", "ptq"):
        group = [r for r in records if r.kind == kind]
        if not group:
            continue
        shared, varying = _shared_and_varying(group)
        parts.append(f"<h3>{kind} stages ({len(group)})</h3><details open><summary>settings common to all</summary>"
                     f"<pre>{_esc(json.dumps(shared, indent=2, sort_keys=True))}</pre></details>")
        rows = "".join(f"<tr><td>{_esc(stage)}</td><td><code>{_esc(json.dumps(diff, sort_keys=True))}</code></td></tr>"
                       for stage, diff in sorted(varying.items()))
        parts.append(f"<table><tr><th>stage</th><th>settings that differ</th></tr>{rows}</table>")
    parts.append(f"<h3>report</h3><pre>{_esc(json.dumps(dict(report_params), indent=2, sort_keys=True))}</pre>")
    fingerprints = "".join(f"<tr><td>{_esc(r.stage)}</td><td>{_esc(r.kind)}</td><td><code>{_esc(r.fingerprint[:16])}</code></td>"
                           f"<td>{_esc(r.tags.get('recipe', ''))}</td><td>{_esc(r.tags.get('backend', ''))}</td></tr>"
                           for r in sorted(records, key=lambda r: r.stage))
    parts.append("<h3>Stages (fingerprint: hash of params, image, code and inputs)</h3>"
                 f"<table><tr><th>stage</th><th>kind</th><th>fingerprint</th><th>recipe</th><th>backend</th></tr>{fingerprints}</table>")
    return "".join(parts)


def _versions(records: list[StageRecord], report_versions: Mapping[str, str]) -> str:
    seen: dict[tuple[str, str], list[str]] = {}
    for record in records:
        for package, version in (record.summary.get("versions") or {}).items():
            seen.setdefault((package, version), []).append(record.stage)
    rows = "".join(f"<tr><td>{_esc(package)}</td><td>{_esc(version)}</td><td>{_esc(', '.join(sorted(stages)))}</td></tr>"
                   for (package, version), stages in sorted(seen.items()))
    rows += "".join(f"<tr><td>{_esc(package)}</td><td>{_esc(version)}</td><td>report</td></tr>"
                    for package, version in sorted(report_versions.items()))
    return f"<h2>Versions</h2><table><tr><th>package</th><th>version</th><th>stages</th></tr>{rows}</table>"


def to_html(study: Study, title: str, description: str, plots: list[Path], records: list[StageRecord],
            report_params: Mapping[str, Any], report_versions: Mapping[str, str]) -> str:
    differences = "".join(f"<li>{_esc(d.label)}, %: {_esc(pct_cell(d.pct, d.low, d.high))}</li>" for d in study.differences)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_esc(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        f"<p>{_esc(description)}</p>" if description else "",
        ("<p class='legend'><span style='background:#fff8e1'>within noise: the interval includes no difference (0 %, or a ratio of 1x)</span>"
         "<span style='background:#fdecea'>not comparable: a device was shared during the timed steps</span></p>"),
        _table(study),
        f"<h2>Paired differences in val loss (deployed)</h2><ul>{differences}</ul>" if differences else "",
        "<h2>Notes</h2><ul>" + "".join(f"<li>{_esc(note)}</li>" for note in notes(study)) + "</ul>",
        "<h2>Plots</h2>" + "".join(_image(path) for path in plots),
        _settings(records, report_params),
        _versions(records, report_versions),
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part) + "\n"
