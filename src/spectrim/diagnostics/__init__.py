"""Compressibility diagnostics: :func:`analyze` a trained model layer by layer.

Per unit group (the channels that are kept or removed together): the eigenvalue spectrum of
the activations' second-moment matrix, the degrees of freedom ``N(λ)``, the effective rank,
the interpolative-decomposition error curve and the width it predicts for an error budget;
per weight matrix: the PQ index (ℓ_q soft sparsity), spectral norm and stable rank; and
theory against practice on held-out data (predicted vs measured reconstruction error, and
the correlation of ``N(λ)/m`` with the accuracy kept when a layer alone is compressed).

Example::

    >>> import torch, torch.nn as nn
    >>> from spectrim.diagnostics import analyze
    >>> net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    >>> report = analyze(net, torch.randn(256, 8), sensitivity=False)
    >>> [g.name for g in report.groups]
    ['0']
    >>> paths = report.write("analysis/")  # doctest: +SKIP
"""

from spectrim.diagnostics.compute import DEFAULT_ALPHAS, analyze, correlations, weight_diagnostics
from spectrim.diagnostics.plots import PLOT_TITLES, render_plots
from spectrim.diagnostics.render import findings, text_table, to_html, to_markdown
from spectrim.diagnostics.report import (
    CompressibilityReport,
    GroupDiagnostics,
    SensitivityResult,
    WeightDiagnostics,
    json_safe,
)

__all__ = [
    "DEFAULT_ALPHAS",
    "PLOT_TITLES",
    "CompressibilityReport",
    "GroupDiagnostics",
    "SensitivityResult",
    "WeightDiagnostics",
    "analyze",
    "correlations",
    "findings",
    "json_safe",
    "render_plots",
    "text_table",
    "to_html",
    "to_markdown",
    "weight_diagnostics",
]
