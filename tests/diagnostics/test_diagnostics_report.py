"""The report object and its files: JSON round-trip, Markdown, HTML, PNG plots."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spectrim.diagnostics import (
    PLOT_TITLES,
    CompressibilityReport,
    GroupDiagnostics,
    SensitivityResult,
    json_safe,
    render_plots,
)


def test_json_round_trip(r20_report: CompressibilityReport, tmp_path: Path) -> None:
    text = r20_report.to_json(tmp_path / "r.json")
    data = json.loads(text)  # strict JSON: to_json uses allow_nan=False
    assert data["summary"]["groups"] == 9
    assert data["groups"][0]["compressible_fraction"] == r20_report.groups[0].compressible_fraction
    back = CompressibilityReport.from_json((tmp_path / "r.json").read_text())
    assert back == r20_report
    assert back.groups[3].sensitivity == r20_report.groups[3].sensitivity


def test_json_safe_floats() -> None:
    r = CompressibilityReport(alphas=[1e-3], dof_alpha=1e-3, spearman=float("nan"))
    r.groups.append(GroupDiagnostics(index=0, name="a", width=2, measured_error=float("inf")))
    d = json.loads(r.to_json())
    assert d["spearman"] is None and d["groups"][0]["measured_error"] is None
    assert json_safe({"x": np.float64(0.5), "n": np.int64(3)}) == {"x": 0.5, "n": 3}
    assert type(json_safe(np.int64(3))) is int


def test_files_written(r20_written: dict[str, Path], r20_report: CompressibilityReport) -> None:
    assert set(PLOT_TITLES) <= set(r20_written)  # sensitivity ran: all six plots
    for name in PLOT_TITLES:
        with Image.open(r20_written[name]) as img:
            assert img.format == "PNG" and img.width >= 600 and img.height >= 400
    saved = CompressibilityReport.from_json(r20_written["json"].read_text())
    assert [g.name for g in saved.groups] == [g.name for g in r20_report.groups]


def test_markdown_lists_every_group(r20_written: dict[str, Path]) -> None:
    md = r20_written["markdown"].read_text()
    report = CompressibilityReport.from_json(r20_written["json"].read_text())
    for g in report.groups:
        assert re.search(rf"^\| {re.escape(g.name)} \| {g.width} \|", md, re.M), g.name
    for w in report.weights:
        assert f"| {w.name} |" in md
    assert "## Findings" in md and "Spearman" in md
    for name in PLOT_TITLES:
        assert f"]({name}.png)" in md


def test_html_is_self_contained(r20_written: dict[str, Path]) -> None:
    page = r20_written["html"].read_text()
    report = CompressibilityReport.from_json(r20_written["json"].read_text())
    assert page.startswith("<!DOCTYPE html>")
    table = page.split('<table id="groups">')[1].split("</table>")[0]
    rows = re.findall(r'<tr class="row" data-name="([^"]+)">', table)
    assert rows == [g.name for g in report.groups]
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(PLOT_TITLES)
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as img:
            assert img.width > 0
    # nothing fetched from elsewhere
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    assert "<script" not in page and "<link" not in page


def test_findings_and_table(r20_report: CompressibilityReport) -> None:
    text = r20_report.table()
    for g in r20_report.groups:
        assert g.name in text
    md = r20_report.markdown()
    assert "channels" in md and "Theory vs practice" in md


def _synthetic(n: int) -> CompressibilityReport:
    r = CompressibilityReport(model="Synthetic", alphas=[1e-3, 1e-2], dof_alpha=1e-2, error=0.1)
    rng = np.random.default_rng(0)
    for i in range(n):
        m = 8 + i
        eig = np.sort(rng.exponential(size=m))[::-1]
        eig /= eig.sum()
        curve = np.sqrt(np.clip(1 - np.cumsum(np.r_[0, eig]), 0, 1))
        kept = float(rng.uniform(0.5, 1))
        r.groups.append(
            GroupDiagnostics(
                index=i,
                name=f"layer{i}",
                width=m,
                rank=m,
                eigenvalues=eig.tolist(),
                dof=[float(np.sum(eig / (eig + a))) for a in r.alphas],
                dof_at_alpha=float(np.sum(eig / (eig + 1e-2))),
                error_curve=curve.tolist(),
                predicted_width=max(1, m // 2),
                predicted_error=float(curve[max(1, m // 2)]),
                measured_error=float(curve[max(1, m // 2)]) * 1.1,
                sensitivity=SensitivityResult(width=2, agreement=kept, kept=kept),
            )
        )
    return r


@pytest.mark.parametrize("n", [3, 30])
def test_plots_for_few_and_many_layers(n: int) -> None:
    """Few layers get a legend, many a depth colour bar; all plots render."""
    images = render_plots(_synthetic(n))
    assert set(images) == set(PLOT_TITLES)
    with Image.open(io.BytesIO(images["compressible"])) as img:
        assert img.width >= (1100 if n == 30 else 700)


def test_empty_report_renders() -> None:
    r = CompressibilityReport(model="Empty")
    assert render_plots(r) == {}
    assert "nothing to analyse" in r.markdown()
    assert "<table" in r.html()
