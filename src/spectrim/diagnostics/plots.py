"""PNG plots of a :class:`~spectrim.diagnostics.report.CompressibilityReport` (matplotlib).

Figures are built with :class:`matplotlib.figure.Figure` and rendered by the Agg canvas, so
no pyplot state or GUI backend is touched. Layers are coloured by depth (viridis, shallow =
dark); a legend is drawn only for a few layers, otherwise a depth colour bar.

Example::

    >>> from spectrim.diagnostics.report import CompressibilityReport
    >>> render_plots(CompressibilityReport())
    {}
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np

from spectrim.diagnostics.report import CompressibilityReport, GroupDiagnostics

__all__ = ["PLOT_TITLES", "render_plots"]

#: Plot name → caption (in display order).
PLOT_TITLES: dict[str, str] = {
    "spectra": "Eigenvalue spectra (normalised by the trace) of every layer",
    "dof": "Degrees of freedom N(λ)/m against the relative ridge α (λ = α·tr Σ̂)",
    "error_curves": "ID reconstruction error against the kept share of channels",
    "compressible": "Predicted compressible share of channels per layer",
    "heldout_error": "Predicted (calibration) against measured (held-out) error",
    "sensitivity": "N(λ)/m against the accuracy kept when the layer alone is compressed",
}

_LEGEND_MAX = 10  # more layers: colour bar instead of a legend
_LABEL_MAX = 16  # more points: no per-point labels in scatters
_DPI = 110


def render_plots(report: CompressibilityReport) -> dict[str, bytes]:
    """All plots that apply to ``report``, as ``{name: PNG bytes}`` (see :data:`PLOT_TITLES`).

    Raises ``ImportError`` when matplotlib is missing.
    """
    if not report.groups:
        return {}
    import matplotlib

    del matplotlib  # imported to fail early with a clear ImportError
    makers: dict[str, Callable[[CompressibilityReport], Any]] = {
        "spectra": _spectra,
        "dof": _dof,
        "error_curves": _error_curves,
        "compressible": _compressible,
        "heldout_error": _heldout_error,
        "sensitivity": _sensitivity,
    }
    out: dict[str, bytes] = {}
    for name, make in makers.items():
        fig = make(report)
        if fig is not None:
            out[name] = _png(fig)
    return out


# ------------------------------------------------------------------------------------ helpers


def _figure(width: float = 7.0, height: float = 4.4) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    return fig


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _colors(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(0.9 * i / max(n - 1, 1)) for i in range(n)]


def _legend_or_colorbar(fig: Any, ax: Any, groups: list[GroupDiagnostics]) -> None:
    if len(groups) <= _LEGEND_MAX:
        ax.legend(fontsize=8, loc="best", framealpha=0.8)
        return
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cmap = matplotlib.colors.ListedColormap(_colors(len(groups)))
    sm = ScalarMappable(norm=Normalize(0, len(groups) - 1), cmap=cmap)
    bar = fig.colorbar(sm, ax=ax, pad=0.01)
    bar.set_label("layer depth (0 = first analysed group)", fontsize=9)
    bar.ax.tick_params(labelsize=8)


def _style(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=10)
    ax.tick_params(labelsize=9)
    ax.grid(True, which="major", alpha=0.3)


# -------------------------------------------------------------------------------------- plots


def _depth_lines(
    report: CompressibilityReport,
    xy: Callable[[GroupDiagnostics], tuple[np.ndarray, np.ndarray]],
    labels: tuple[str, str, str],
    decorate: Callable[[Any, list[Any]], None],
) -> Any:
    """One line per group, coloured by depth; ``decorate(ax, colors)`` adds the rest."""
    fig = _figure()
    ax = fig.add_subplot()
    colors = _colors(len(report.groups))
    for g, color in zip(report.groups, colors):
        x, y = xy(g)
        if len(x):
            ax.plot(x, y, color=color, lw=1.3, alpha=0.85, label=g.name)
    decorate(ax, colors)
    _style(ax, *labels)
    _legend_or_colorbar(fig, ax, report.groups)
    return fig


def _spectra(report: CompressibilityReport) -> Any:
    def xy(g: GroupDiagnostics) -> tuple[np.ndarray, np.ndarray]:
        eig = np.asarray(g.eigenvalues, dtype=np.float64)
        pos = eig > 0  # log scale: exact zeros (dead or duplicated channels) are left out
        return ((np.arange(eig.size) + 1) / max(eig.size, 1))[pos], eig[pos]

    def decorate(ax: Any, colors: list[Any]) -> None:
        positive = [v for g in report.groups for v in g.eigenvalues if v > 0]
        ax.set_yscale("log")
        ax.set_ylim(bottom=max(min(positive, default=1.0) * 0.5, 1e-12))

    return _depth_lines(
        report, xy, ("Eigenvalue decay", "normalised index i / m", "eigenvalue / trace"), decorate
    )


def _dof(report: CompressibilityReport) -> Any:
    from spectrim.linalg import degrees_of_freedom

    lo, hi = min(report.alphas) / 10, max(report.alphas) * 10
    grid = np.logspace(np.log10(lo), np.log10(hi), 80)

    def xy(g: GroupDiagnostics) -> tuple[np.ndarray, np.ndarray]:
        return grid, np.atleast_1d(degrees_of_freedom(g.eigenvalues, grid)) / g.width

    def decorate(ax: Any, colors: list[Any]) -> None:
        for g, color in zip(report.groups, colors):
            ax.plot(report.alphas, np.asarray(g.dof) / g.width, "o", color=color, ms=3)
        ax.axvline(report.dof_alpha, color="0.4", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)

    title = "Degrees of freedom (dashed: α of the correlation)"
    return _depth_lines(report, xy, (title, "α  (λ = α·tr Σ̂)", "N(λ) / m"), decorate)


def _error_curves(report: CompressibilityReport) -> Any:
    def xy(g: GroupDiagnostics) -> tuple[np.ndarray, np.ndarray]:
        curve = np.asarray(g.error_curve, dtype=np.float64)
        return np.arange(curve.size) / max(curve.size - 1, 1), curve

    def decorate(ax: Any, colors: list[Any]) -> None:
        ax.axhline(report.error, color="crimson", ls="--", lw=1, label=f"error = {report.error:g}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)

    labels = ("ID error curves", "kept share of channels k / m", "relative error ‖Z − Z_S T‖ / ‖Z‖")
    return _depth_lines(report, xy, labels, decorate)


def _compressible(report: CompressibilityReport) -> Any:
    groups = report.groups
    n = len(groups)
    fig = _figure(width=max(7.0, min(0.32 * n + 2.0, 18.0)), height=4.6)
    ax = fig.add_subplot()
    values = [g.compressible_fraction for g in groups]
    ax.bar(range(n), values, color=_colors(n), edgecolor="0.3", lw=0.4)
    ax.set_xticks(range(n))
    ax.set_xticklabels(
        [g.name for g in groups],
        rotation=60 if n > 6 else 0,
        ha="right",
        fontsize=8 if n > 12 else 9,
    )
    ax.set_ylim(0, 1)
    _style(
        ax,
        f"Removable channels at relative error {report.error:g} "
        f"(all layers: {report.compressible_fraction:.0%})",
        "",
        "1 − k / m",
    )
    ax.grid(True, axis="y", alpha=0.3)
    ax.grid(False, axis="x")
    return fig


def _scatter_labels(
    fig: Any,
    ax: Any,
    report: CompressibilityReport,
    xs: list[float],
    ys: list[float],
    names: list[str],
) -> None:
    """Name every point, or (too many to read) show the depth colour bar instead."""
    if len(names) > _LABEL_MAX:
        _legend_or_colorbar(fig, ax, report.groups)
        return
    for x, y, name in zip(xs, ys, names):
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")


def _heldout_error(report: CompressibilityReport) -> Any:
    groups = [g for g in report.groups if g.measured_error is not None]
    if not groups:
        return None
    fig = _figure(width=6.0, height=5.0)
    ax = fig.add_subplot()
    xs = [g.predicted_error for g in groups]
    ys = [float(g.measured_error or 0.0) for g in groups]
    colors = _colors(len(report.groups))
    ax.scatter(
        xs,
        ys,
        c=[colors[report.groups.index(g)] for g in groups],
        s=28,
        edgecolors="0.2",
        linewidths=0.4,
        zorder=3,
    )
    top = max([*xs, *ys, 1e-3]) * 1.1
    ax.plot([0, top], [0, top], color="0.5", ls="--", lw=1, label="measured = predicted")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    _scatter_labels(fig, ax, report, xs, ys, [g.name for g in groups])
    _style(
        ax,
        "Theory vs practice: reconstruction error",
        "predicted (calibration ID curve)",
        "measured on held-out data",
    )
    ax.legend(fontsize=8, loc="upper left")
    return fig


def _sensitivity(report: CompressibilityReport) -> Any:
    pts = [(g, g.dof_ratio, kept) for g in report.groups if (kept := g.kept) is not None]
    if not pts:
        return None
    fig = _figure(width=6.4, height=4.8)
    ax = fig.add_subplot()
    colors = _colors(len(report.groups))
    xs = [x for _, x, _ in pts]
    ys = [y for _, _, y in pts]
    ax.scatter(
        xs,
        ys,
        c=[colors[report.groups.index(g)] for g, _, _ in pts],
        s=30,
        edgecolors="0.2",
        linewidths=0.4,
        zorder=3,
    )
    if len(pts) >= 2 and np.ptp(xs) > 0:
        slope, icpt = np.polyfit(xs, ys, 1)
        xx = np.linspace(min(xs), max(xs), 2)
        ax.plot(xx, slope * xx + icpt, color="0.5", ls="--", lw=1)
    _scatter_labels(fig, ax, report, xs, ys, [g.name for g, _, _ in pts])
    rho = "n/a" if report.spearman is None else f"{report.spearman:+.2f}"
    r = "n/a" if report.pearson is None else f"{report.pearson:+.2f}"
    ylabel = (
        "accuracy kept (relative)"
        if report.sensitivity_metric == "accuracy"
        else ("agreement with the original")
    )
    _style(
        ax,
        f"Layer alone at {report.sensitivity_fraction:g} width: Spearman {rho}, Pearson {r}",
        f"N(λ)/m at α = {report.dof_alpha:g}",
        ylabel,
    )
    return fig
