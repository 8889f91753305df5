"""Text, Markdown and self-contained HTML views of a compressibility report.

All three views are built from the same rows (:func:`group_rows`, :func:`weight_rows`) and
findings (:func:`findings`). The HTML embeds its PNGs as base64 ``data:`` URIs and its CSS
inline, so the single file opens anywhere without other resources.

Example::

    >>> from spectrim.diagnostics.report import CompressibilityReport, GroupDiagnostics
    >>> r = CompressibilityReport(model="Net", alphas=[1e-3], dof_alpha=1e-3)
    >>> r.groups.append(GroupDiagnostics(index=1, name="fc1", width=8, predicted_width=2))
    >>> "| fc1 | 8 |" in to_markdown(r, {})
    True
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

from spectrim.diagnostics.report import CompressibilityReport, GroupDiagnostics

__all__ = [
    "DEFINITIONS",
    "findings",
    "group_columns",
    "group_rows",
    "text_table",
    "to_html",
    "to_markdown",
    "weight_columns",
    "weight_rows",
]

#: Short definitions shown under the tables (formulas in docs/analyze.md).
DEFINITIONS: tuple[tuple[str, str], ...] = (
    ("Σ̂", "uncentred covariance of a layer's channels at its consumers' inputs "
          "(all consumers stacked, rows = examples × positions)"),
    ("eff. rank", "exp(entropy(μ / Σμ)) of the eigenvalues μ of Σ̂"),
    ("N(λ)/m", "degrees of freedom Σ μ/(μ+λ) divided by the width m, with λ = α·tr Σ̂ "
               "(λ is relative to the trace)"),
    ("k @ E", "smallest width whose interpolative-decomposition relative error "
              "‖Z − Z_S T‖/‖Z‖ on the calibration data is at most E"),
    ("removable", "1 − k/m, the predicted compressible share"),
    ("pred. err", "ID relative error at k on the calibration data (the theory)"),
    ("held-out err", "relative error at k of the calibration-fitted folds on held-out data "
                     "(the practice), summed over consumers"),
    ("kept", "accuracy kept when this layer alone is compressed (see the sensitivity note)"),
    ("PQ index", "I_{p,q}(w) = 1 − d^{1/q−1/p}·‖w‖_p/‖w‖_q, 0 = flat, larger = sparser"),
    ("stable rank", "‖W‖_F² / ‖W‖₂², between 1 and rank(W)"),
)  # fmt: skip


def _f(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


# --------------------------------------------------------------------------------------- rows


def group_columns(report: CompressibilityReport) -> list[str]:
    """Column names of the per-group table."""
    return [
        "layer",
        "width",
        "rank",
        "eff. rank",
        f"N/m @ α={report.dof_alpha:g}",
        f"k @ E={report.error:g}",
        "removable",
        "pred. err",
        "held-out err",
        "kept",
    ]


def group_rows(report: CompressibilityReport) -> list[list[str]]:
    """One row of formatted cells per analysed group (see :func:`group_columns`)."""
    rows = []
    for g in report.groups:
        rows.append(
            [
                g.name,
                str(g.width),
                str(g.rank),
                _f(g.effective_rank, ".1f"),
                _f(g.dof_ratio),
                str(g.predicted_width),
                _f(g.compressible_fraction, ".0%"),
                _f(g.predicted_error),
                _f(g.measured_error),
                _f(g.kept),
            ]
        )
    return rows


def weight_columns(report: CompressibilityReport) -> list[str]:
    """Column names of the per-weight table."""
    pq = f"I({report.pq_p:g},{report.pq_q:g})"
    return [
        "weight",
        "shape",
        "group",
        f"PQ {pq} matrix",
        f"PQ {pq} row mean",
        f"PQ {pq} row median",
        "‖W‖₂",
        "stable rank",
        "ℓq keeps",
    ]


def weight_rows(report: CompressibilityReport) -> list[list[str]]:
    """One row of formatted cells per weight matrix (see :func:`weight_columns`)."""
    return [
        [
            w.name,
            "×".join(str(s) for s in w.shape),
            w.group or "–",
            _f(w.pq_index),
            _f(w.pq_index_row_mean),
            _f(w.pq_index_row_median),
            _f(w.spectral_norm, ".3g"),
            _f(w.stable_rank, ".2f"),
            "–"
            if w.lq_keep is None
            else f"{w.lq_keep} ({w.lq_keep / max(w.shape[0] * w.shape[1], 1):.0%})",
        ]
        for w in report.weights
    ]


# ----------------------------------------------------------------------------------- findings


def _names(groups: Sequence[GroupDiagnostics]) -> str:
    return ", ".join(f"{g.name} ({g.compressible_fraction:.0%})" for g in groups)


def findings(report: CompressibilityReport) -> list[str]:
    """Plain-language findings, one sentence group per entry."""
    out: list[str] = []
    groups = report.groups
    if not groups:
        return ["No prunable unit group was found; nothing to analyse."]
    s = report.summary()
    by_frac = sorted(groups, key=lambda g: g.compressible_fraction, reverse=True)
    out.append(
        f"At relative error {report.error:g}, {s['channels'] - s['predicted_channels']} of "
        f"{s['channels']} channels ({report.compressible_fraction:.0%}) could be removed. "
        f"Most compressible: {_names(by_frac[:3])}; least: {_names(by_frac[::-1][:3])}."
    )
    deficient = [g for g in groups if g.rank < g.width]
    if deficient:
        out.append(
            f"{len(deficient)} layer(s) are numerically rank-deficient (rank < width): some "
            "channels are dead or exact linear combinations of others, and go at no cost: "
            + ", ".join(f"{g.name} ({g.rank}/{g.width})" for g in deficient[:8])
            + ("…" if len(deficient) > 8 else "")
            + "."
        )
    measured = [g for g in groups if g.measured_error is not None]
    if measured:
        worst = max(measured, key=lambda g: abs((g.measured_error or 0.0) - g.predicted_error))
        out.append(
            f"Theory vs practice ({report.n_heldout} held-out examples, {report.heldout_source}): "
            f"mean predicted error {s['mean_predicted_error']:.3f}, mean measured "
            f"{s['mean_measured_error']:.3f}, mean |gap| {s['mean_abs_error_gap']:.3f}; the "
            f"largest gap is {worst.name} ({worst.predicted_error:.3f} predicted, "
            f"{worst.measured_error:.3f} measured). A measured error well above the prediction "
            "means the calibration statistics under-sample that layer."
        )
    sens = [(g, kept) for g in groups if (kept := g.kept) is not None]
    if sens:
        worst_s, worst_kept = min(sens, key=lambda pair: pair[1])
        corr = (
            f"Spearman {report.spearman:+.2f}, Pearson {report.pearson:+.2f}"
            if report.spearman is not None and report.pearson is not None
            else "no correlation (too few or constant values)"
        )
        out.append(
            f"Sensitivity over {len(sens)} layers, each alone at "
            f"{report.sensitivity_fraction:g} of its width: {corr} between N(λ)/m "
            f"(α = {report.dof_alpha:g}) and the {report.sensitivity_metric} kept. The theory "
            "expects a negative value (more degrees of freedom, more loss). Most sensitive: "
            f"{worst_s.name} (kept {worst_kept:.3f})."
        )
        others = [
            f"{name} {c['spearman']:+.2f}"
            for name, c in report.correlation_table.items()
            if name != "N/m vs kept"
            and c.get("spearman") is not None
            and not (report.sensitivity_metric == "agreement" and name.endswith("kept"))
        ]
        if others:
            out.append(
                "Other pairings (Spearman; N = N(λ) unnormalised): " + "; ".join(others) + "."
            )
        scale = (report.baseline_accuracy or 1.0) * report.n_heldout
        spread = (max(k for _, k in sens) - worst_kept) * scale
        if len(sens) >= 3 and spread < 10:
            out.append(
                f"Caution: the {report.sensitivity_metric} kept spans only about {spread:.0f} "
                f"held-out examples across layers, so its correlation is close to sampling "
                "noise; more held-out examples or a smaller sensitivity fraction sharpen it."
            )
    if report.weights:
        top = max(report.weights, key=lambda w: w.pq_index)
        low = min(report.weights, key=lambda w: w.stable_rank)
        out.append(
            f"Weights: the sparsest matrix is {top.name} (PQ index {top.pq_index:.3f}); the "
            f"lowest stable rank is {low.name} ({low.stable_rank:.2f} of {min(low.shape)})."
        )
    if report.pinned:
        out.append(
            f"{len(report.pinned)} group(s) cannot be pruned and are not analysed (see Pinned)."
        )
    return out


# --------------------------------------------------------------------------------------- text


def text_table(report: CompressibilityReport) -> str:
    """Fixed-width per-group table for terminals."""
    cols = group_columns(report)
    rows = group_rows(report)
    widths = [
        max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)
    ]
    widths[0] = min(widths[0], 28)

    def line(cells: Sequence[str]) -> str:
        first = cells[0] if len(cells[0]) <= widths[0] else "…" + cells[0][-(widths[0] - 1) :]
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first.ljust(widths[0]), *rest])

    header = line(cols)
    return "\n".join([header, "-" * len(header), *(line(r) for r in rows)])


# ----------------------------------------------------------------------------------- markdown


def _md_table(cols: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    out = ["| " + " | ".join(esc(c) for c in cols) + " |"]
    out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|")
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return out


def _setup_lines(report: CompressibilityReport) -> list[str]:
    return [
        f"model: {report.model}",
        f"calibration examples: {report.n_calibration}; held-out examples: {report.n_heldout} "
        f"({report.heldout_source})",
        f"λ = α·tr(Σ̂) with α ∈ {{{', '.join(f'{a:g}' for a in report.alphas)}}}; "
        f"error budget E = {report.error:g}",
        f"accuracy kept: {report.sensitivity_meaning or 'not measured'}",
        f"analysis time: {report.seconds:.1f} s",
    ]


def to_markdown(report: CompressibilityReport, images: dict[str, str]) -> str:
    """Markdown summary; ``images`` maps plot names to the relative PNG files to link."""
    from spectrim.diagnostics.plots import PLOT_TITLES

    lines = [f"# Compressibility report: {report.model}", ""]
    lines += [f"- {s}" for s in _setup_lines(report)]
    lines += ["", "## Findings", ""] + [f"- {s}" for s in findings(report)]
    lines += ["", "## Layers (unit groups)", ""]
    lines += _md_table(group_columns(report), group_rows(report))
    lines += ["", "## Weight matrices", ""]
    lines += _md_table(weight_columns(report), weight_rows(report))
    if images:
        lines += ["", "## Plots", ""]
        for name, title in PLOT_TITLES.items():
            if name in images:
                lines += [f"### {title}", "", f"![{title}]({images[name]})", ""]
    lines += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in DEFINITIONS]
    if report.pinned:
        lines += ["", "## Pinned (not analysed)", ""]
        lines += [f"- {name}: {why}" for name, why in report.pinned.items()]
    notes = [*report.warnings, *report.notes]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------- html

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #1b1f24; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #3b528b; padding-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 1.8em; color: #3b528b; }
table { border-collapse: collapse; font-size: .86em; margin: .6em 0; }
th, td { border: 1px solid #d0d7de; padding: .3em .6em; text-align: right; }
th { background: #eef1f6; position: sticky; top: 0; }
td:first-child, th:first-child { text-align: left; font-family: ui-monospace, monospace; }
tbody tr:nth-child(even) { background: #f7f8fa; }
tbody tr:hover { background: #e8f0fe; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 1em; }
figure { margin: 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { font-size: .9em; color: #57606a; }
ul.findings li { margin-bottom: .4em; }
dl dt { font-weight: 600; } dl dd { margin: 0 0 .4em 1.2em; color: #57606a; }
.meta { color: #57606a; font-size: .92em; }
"""


def _html_table(table_id: str, cols: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in cols)
    body = "".join(
        f'<tr class="row" data-name="{e(r[0])}">' + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>"
        for r in rows
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def to_html(report: CompressibilityReport, images: dict[str, bytes]) -> str:
    """Self-contained HTML page; ``images`` maps plot names to PNG bytes (embedded)."""
    from spectrim.diagnostics.plots import PLOT_TITLES

    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Compressibility report: {e(report.model)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Compressibility report: {e(report.model)}</h1>",
        '<ul class="meta">' + "".join(f"<li>{e(s)}</li>" for s in _setup_lines(report)) + "</ul>",
        "<h2>Findings</h2>",
        '<ul class="findings">' + "".join(f"<li>{e(s)}</li>" for s in findings(report)) + "</ul>",
        "<h2>Layers (unit groups)</h2>",
        _html_table("groups", group_columns(report), group_rows(report)),
    ]
    if images:
        parts.append('<h2>Plots</h2><div class="plots">')
        for name, title in PLOT_TITLES.items():
            if name in images:
                data = base64.b64encode(images[name]).decode("ascii")
                parts.append(
                    f'<figure id="plot-{name}"><img alt="{e(title)}" '
                    f'src="data:image/png;base64,{data}"><figcaption>{e(title)}</figcaption>'
                    "</figure>"
                )
        parts.append("</div>")
    parts += [
        "<h2>Weight matrices</h2>",
        _html_table("weights", weight_columns(report), weight_rows(report)),
        "<h2>Definitions</h2>",
        "<dl>" + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in DEFINITIONS) + "</dl>",
    ]
    if report.pinned:
        parts.append("<h2>Pinned (not analysed)</h2><ul>")
        parts += [f"<li><code>{e(n)}</code>: {e(w)}</li>" for n, w in report.pinned.items()]
        parts.append("</ul>")
    notes = [*report.warnings, *report.notes]
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
