"""The compressibility report: dataclasses, JSON round-trip, text table, files on disk.

:func:`spectrim.analyze` returns a :class:`CompressibilityReport`; ``report.write(out_dir)``
writes ``report.json``, ``report.md``, ``report.html`` (self-contained) and the PNG plots.

Example::

    >>> r = CompressibilityReport(model="Net", alphas=[1e-3], dof_alpha=1e-3, error=0.1)
    >>> CompressibilityReport.from_json(r.to_json()) == r
    True
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from spectrim._files import atomic_write_text

__all__ = [
    "CompressibilityReport",
    "GroupDiagnostics",
    "SensitivityResult",
    "WeightDiagnostics",
    "json_safe",
]


def json_safe(obj: Any) -> Any:
    """``obj`` with every float made JSON-safe (NaN/inf → ``None``) and numpy scalars unwrapped.

    Example::

        >>> json_safe({"a": float("nan"), "b": [1.5, float("inf")]})
        {'a': None, 'b': [1.5, None]}
    """
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


@dataclass
class SensitivityResult:
    """What happens at the output when ONE group alone is compressed (ID, one-shot folds).

    Attributes:
        width: channels kept (``max(1, round(sensitivity_fraction·m))``).
        agreement: share of held-out examples whose top-1 prediction equals the original's.
        accuracy: top-1 accuracy on the held-out labels (``None`` without labels).
        kept: the "accuracy kept" used for the correlation: ``accuracy / original accuracy``
            with labels, else ``agreement`` (see ``CompressibilityReport.sensitivity_meaning``).
    """

    width: int
    agreement: float
    accuracy: float | None = None
    kept: float | None = None


@dataclass
class GroupDiagnostics:
    """Spectral and ID statistics of one prunable unit group.

    Attributes:
        index, name, width: the group (``spectrim.graph.UnitGroup``) and its channel count m.
        producers, consumers: module names writing and reading the channels.
        rows: calibration rows behind the summed Gram (examples × positions × consumers).
        rank: number of non-zero eigenvalues of ``Σ̂`` (numerical rank).
        effective_rank: ``exp(entropy(μ/Σμ))``.
        eigenvalues: eigenvalues of ``Σ̂ = Σ_c G_c / rows`` divided by ``tr Σ̂``, descending
            (they sum to 1).
        dof: ``N(λ)`` for ``λ = α·tr Σ̂`` at each ``α`` of ``CompressibilityReport.alphas``.
        dof_at_alpha: ``N(λ)`` at ``CompressibilityReport.dof_alpha`` (the correlation's λ).
        error_curve: ID relative error ``√e[k]`` for ``k = 0..m`` (index = kept channels),
            from the calibration Grams.
        predicted_width: smallest ``k >= 1`` with ``error_curve[k] <= error``.
        predicted_error: ``error_curve[predicted_width]``.
        measured_error: held-out relative error at ``predicted_width`` with the folds fitted
            on calibration, summed over consumers: ``√(Σ_c res_c / Σ_c tr G_c)``.
        consumer_errors: the same, per consumer.
        sensitivity: :class:`SensitivityResult`, or ``None`` when not measured.
    """

    index: int
    name: str
    width: int
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    rows: int = 0
    rank: int = 0
    effective_rank: float = 0.0
    eigenvalues: list[float] = field(default_factory=list)
    dof: list[float] = field(default_factory=list)
    dof_at_alpha: float = 0.0
    error_curve: list[float] = field(default_factory=list)
    predicted_width: int = 0
    predicted_error: float = 0.0
    measured_error: float | None = None
    consumer_errors: dict[str, float] = field(default_factory=dict)
    sensitivity: SensitivityResult | None = None

    @property
    def compressible_fraction(self) -> float:
        """``1 − predicted_width / width``: the share of channels the error budget lets go."""
        return 1.0 - self.predicted_width / self.width if self.width else 0.0

    @property
    def kept(self) -> float | None:
        """The sensitivity run's accuracy kept (``None`` when not measured)."""
        return self.sensitivity.kept if self.sensitivity is not None else None

    @property
    def dof_ratio(self) -> float:
        """``N(λ)/m`` at the correlation's ``α``."""
        return self.dof_at_alpha / self.width if self.width else 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroupDiagnostics:
        d = _known(cls, d)
        sens = d.get("sensitivity")
        d["sensitivity"] = SensitivityResult(**_known(SensitivityResult, sens)) if sens else None
        return cls(**d)


@dataclass
class WeightDiagnostics:
    """Soft sparsity and spectrum of one Conv/Linear weight, read as ``(out, in·kh·kw)``.

    Attributes:
        name: module name.
        shape: ``[rows, columns]`` of the matrix.
        group: name of the unit group whose channels this module produces (``None`` if none).
        pq_index: PQ index ``I_{p,q}`` of the whole matrix (all entries pooled).
        pq_index_row_mean, pq_index_row_median: of the per-row (per-neuron) values.
        spectral_norm: ``‖W‖₂``.
        frobenius_norm: ``‖W‖_F``.
        stable_rank: ``‖W‖_F² / ‖W‖₂²``.
        lq_keep: the weights Paper 3's ℓq bound says the matrix needs, summed over its
            rows: ``⌈d·SI_q^{−q/(1−q)}⌉`` per row with ``q = 0.5``, ``η = 0`` (the
            ``lq`` method's ``target="auto"`` keeps exactly these).
    """

    name: str
    shape: list[int]
    group: str | None = None
    pq_index: float = 0.0
    pq_index_row_mean: float = 0.0
    pq_index_row_median: float = 0.0
    spectral_norm: float = 0.0
    frobenius_norm: float = 0.0
    stable_rank: float = 0.0
    lq_keep: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WeightDiagnostics:
        return cls(**_known(cls, d))


def _known(cls: Any, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class CompressibilityReport:
    """Result of :func:`spectrim.analyze`: per-group spectra and ID curves, per-weight
    sparsity, and theory-vs-practice checks on held-out data.

    Attributes:
        model: the model's class name.
        n_calibration, n_heldout: examples used for the statistics and for the checks.
        heldout_source: where the held-out examples came from.
        alphas: relative ridge levels; ``λ = α·tr Σ̂`` per group.
        dof_alpha: the ``α`` whose ``N(λ)/m`` is correlated with the accuracy kept.
        error: the relative ID error that defines ``predicted_width``.
        pq_p, pq_q: exponents of the PQ index ``I_{p,q}`` (``p < q``).
        sensitivity_fraction: kept share of channels in the one-layer sensitivity runs.
        sensitivity_metric: ``"accuracy"``, ``"agreement"`` or ``None`` (not run).
        sensitivity_meaning: what "accuracy kept" means in this report.
        baseline_accuracy: the original model's held-out accuracy (with labels).
        spearman, pearson: correlation of ``N(λ)/m`` with the accuracy kept across groups.
        correlation_table: ``"X vs Y" → {"spearman", "pearson"}`` for X in ``N/m`` (``N(λ)/m``)
            and ``N`` (``N(λ)``), Y in ``kept`` and ``agreement`` (finer-grained than accuracy).
        groups, weights: :class:`GroupDiagnostics`, :class:`WeightDiagnostics`.
        pinned: group name → why it is not analysed (cannot be pruned).
        warnings, notes: things the reader should know.
        timings: seconds per stage; seconds: total.
    """

    model: str = ""
    n_calibration: int = 0
    n_heldout: int = 0
    heldout_source: str = ""
    alphas: list[float] = field(default_factory=list)
    dof_alpha: float = 0.0
    error: float = 0.1
    pq_p: float = 0.5
    pq_q: float = 1.0
    sensitivity_fraction: float = 0.25
    sensitivity_metric: str | None = None
    sensitivity_meaning: str = ""
    baseline_accuracy: float | None = None
    spearman: float | None = None
    pearson: float | None = None
    correlation_table: dict[str, dict[str, float | None]] = field(default_factory=dict)
    groups: list[GroupDiagnostics] = field(default_factory=list)
    weights: list[WeightDiagnostics] = field(default_factory=list)
    pinned: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    # ------------------------------------------------------------------------------ summaries

    @property
    def error_gaps(self) -> list[float]:
        """``measured − predicted`` held-out error for every group that has both."""
        return [
            g.measured_error - g.predicted_error
            for g in self.groups
            if g.measured_error is not None
        ]

    @property
    def compressible_fraction(self) -> float:
        """Channels removable at ``error`` over all analysed groups: ``1 − Σk / Σm``."""
        total = sum(g.width for g in self.groups)
        return 1.0 - sum(g.predicted_width for g in self.groups) / total if total else 0.0

    def summary(self) -> dict[str, Any]:
        """Key numbers: groups, compressible share, error gap, correlations."""
        gaps = self.error_gaps
        measured = [g for g in self.groups if g.measured_error is not None]
        return json_safe(
            {
                "groups": len(self.groups),
                "channels": sum(g.width for g in self.groups),
                "predicted_channels": sum(g.predicted_width for g in self.groups),
                "compressible_fraction": self.compressible_fraction,
                "error": self.error,
                "mean_predicted_error": _mean([g.predicted_error for g in measured]),
                "mean_measured_error": _mean([g.measured_error or 0.0 for g in measured]),
                "mean_abs_error_gap": _mean([abs(x) for x in gaps]),
                "max_abs_error_gap": max((abs(x) for x in gaps), default=None),
                "sensitivity_metric": self.sensitivity_metric,
                "sensitivity_groups": sum(g.sensitivity is not None for g in self.groups),
                "dof_alpha": self.dof_alpha,
                "spearman": self.spearman,
                "pearson": self.pearson,
            }
        )

    # ------------------------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (NaN/inf → ``None``), with derived fields for readers."""
        d = asdict(self)
        for g, gd in zip(self.groups, d["groups"]):
            gd["compressible_fraction"] = g.compressible_fraction
            gd["dof_ratio"] = g.dof_ratio
        d["summary"] = self.summary()
        return json_safe(d)

    def to_json(self, path: str | Path | None = None, indent: int | None = 2) -> str:
        """The report as JSON text (also written to ``path`` when given)."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressibilityReport:
        """Inverse of :meth:`to_dict` (derived fields are ignored)."""
        d = _known(cls, d)
        d["groups"] = [GroupDiagnostics.from_dict(g) for g in d.get("groups", [])]
        d["weights"] = [WeightDiagnostics.from_dict(w) for w in d.get("weights", [])]
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> CompressibilityReport:
        """Read a report from JSON text (e.g. ``Path("report.json").read_text()``)."""
        return cls.from_dict(json.loads(text))

    # ---------------------------------------------------------------------------------- output

    def table(self) -> str:
        """A compact per-group text table (what ``spectrim analyze`` prints)."""
        from spectrim.diagnostics.render import text_table

        return text_table(self)

    def markdown(self, images: dict[str, str] | None = None) -> str:
        """The Markdown summary (``images``: plot name → relative file to link)."""
        from spectrim.diagnostics.render import to_markdown

        return to_markdown(self, images or {})

    def html(self, images: dict[str, bytes] | None = None) -> str:
        """Self-contained HTML (``images``: plot name → PNG bytes, embedded as data URIs)."""
        from spectrim.diagnostics.render import to_html

        return to_html(self, images or {})

    def write(
        self, out_dir: str | Path, *, plots: bool = True, overwrite: bool = False
    ) -> dict[str, Path]:
        """Write ``report.json``, ``report.md``, ``report.html`` and the PNG plots.

        The folder is written atomically (a temporary sibling renamed into place); it must
        not exist or be empty unless ``overwrite=True`` (then it is replaced, with
        everything in it). Returns ``{kind: path}`` of everything written (``"json"``,
        ``"markdown"``, ``"html"`` and one entry per plot). Without matplotlib the plots
        are left out and a note says so.
        """
        from spectrim._files import atomic_directory
        from spectrim.diagnostics.plots import render_plots

        out = Path(out_dir)
        images: dict[str, bytes] = {}
        if plots:
            try:
                images = render_plots(self)
            except ImportError as exc:
                self.notes.append(f"plots left out: {exc}")
        written: dict[str, Path] = {}
        links: dict[str, str] = {}
        with atomic_directory(out, overwrite=overwrite) as tmp:
            for name, png in images.items():
                (tmp / f"{name}.png").write_bytes(png)
                written[name] = out / f"{name}.png"
                links[name] = f"{name}.png"
            self.to_json(tmp / "report.json")
            written["json"] = out / "report.json"
            (tmp / "report.md").write_text(self.markdown(links), encoding="utf-8")
            written["markdown"] = out / "report.md"
            (tmp / "report.html").write_text(self.html(images), encoding="utf-8")
            written["html"] = out / "report.html"
        return written


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
