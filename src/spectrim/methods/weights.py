"""Weight sparsification methods: same shapes, fewer non-zeros, new values.

Each method turns one weight matrix (:class:`MatrixUnit`: the weight read as ``out × cols``
and, when the method declares it needs them, the Gram of the layer's inputs) into a
:class:`~spectrim.graph.surgery.WeightPlan`.  They register in the same table as the
channel methods and run through the same :func:`spectrim.compress`::

    >>> import torch, torch.nn as nn, spectrim
    >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> x = torch.randn(256, 16)
    >>> small, report = spectrim.compress(net, x, "obs", "sparsity=0.5", structured=False)
    >>> round(report.sparsity, 2), small[0].weight.shape == net[0].weight.shape
    (0.5, True)

=============  =====================================================================
``magnitude``  largest ``|w|`` per layer, or pooled over the model (``scope="global"``)
``random``     a uniformly random mask (``seed`` of the run)
``wanda``      ``|w_ij|·‖X_j‖`` compared within each row (Sun et al. 2024)
``obs``        SparseGPT's OBS sweep with the damped input Gram as Hessian
``lq``         Paper 3's ABP-M: per neuron the ℓq bound's count of largest weights
``lq-lasso``   Paper 3's ABP-L: each neuron's output refit by the ℓ1-penalised least
               squares on the input Gram
``pqi``        the one-shot PQ-index bound ``(p, q, η)`` per neuron, layer or model
``spectrum``   Paper 4 (our reading): top entries kept, the rest sampled ∝ ``|w|`` /
               ``w²`` / hybrid and rescaled by ``1/p``
=============  =====================================================================

Every mask-only method takes ``refit=True``: the kept weights of each row are refit by
exact masked least squares on the Gram, reconstructing the *original* layer's outputs from
the inputs the already-sparsified prefix produces (the run's ``sequential``).
``allocation="curves"`` (not for the self-sized methods) spreads a ``sparsity`` target over
the matrices by their error curves instead of uniformly
(:func:`spectrim.budget.densities.allocate_densities`); ``allocation="output"`` weights
each matrix's curve by its measured effect on the model's outputs (the output error when
that matrix alone is sparsified, over its own output error), so layers whose errors the
rest of the network amplifies are kept denser.  ``rounds=R`` (magnitude, random, wanda,
obs) reaches the target in ``R`` sequential passes, each keeping the same share of the
remaining weights (densities ``d^{r/R}``); each round's refits reconstruct the outputs of
the model the round started from (``refit_to="previous"``, the default; for one round
that is the original) or of the original (``refit_to="original"``, which diverges at high
sparsity on ResNet-20).  On ResNet-20 at 90% the rounds are the lever that matters
(results.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from torch import nn

from spectrim.graph.modules import WeightKind
from spectrim.linalg.masks import (
    global_threshold,
    lasso_rows,
    magnitude_keep,
    masked_refit,
    nm_keep,
    obc_masks,
    obc_sparsify,
    obs_sparsify,
    pq_keep_counts,
    rows_keep,
    spectrum_sparsify,
    wanda_scores,
)
from spectrim.methods.base import Method, register_method

__all__ = ["MatrixUnit", "WeightMethod"]


@dataclass
class MatrixUnit:
    """One weight matrix and its statistics, as a weight method sees it.

    Attributes:
        name: module name.
        module: the module (read-only for methods).
        kind: its :class:`~spectrim.graph.modules.WeightKind`.
        weight: the current weight matrix, float64 ``out × cols``.
        gram: ``XᵀX`` of the inputs it receives now (the sparsified prefix's, in a
            sequential run), or ``None``.
        cross: ``X_sᵀX_o`` between those inputs and the original model's (sequential runs
            with a refit), or ``None`` (then ``gram`` stands for it).
        mean: column means of the inputs (for methods declaring ``needs_mean``).
        rows: number of input rows behind the Gram.
    """

    name: str
    module: nn.Module
    kind: WeightKind
    weight: np.ndarray
    gram: np.ndarray | None = None
    cross: np.ndarray | None = None
    mean: np.ndarray | None = None
    rows: int = 0


class WeightMethod(Method):
    """A weight-sparsification method.

    Subclasses declare what they need (``needs_gram``: the input Gram of every matrix;
    ``needs_mean``: the input means as well), what they support (``scopes``;
    ``supports_nm`` for ``sparsity=n:m``; ``self_sized`` when ``target="auto"`` lets their
    own rule decide) and implement :meth:`keep` (a mask; the values are then the kept
    weights, or their refit) or override :meth:`sparsify`.
    """

    kind: ClassVar[str] = "weight"
    needs_gram: ClassVar[bool] = False
    needs_mean: ClassVar[bool] = False
    supports_nm: ClassVar[bool] = True
    self_sized: ClassVar[bool] = False
    scopes: ClassVar[tuple[str, ...]] = ("layer",)
    #: the method returns new values itself (a refit would undo them)
    sets_values: ClassVar[bool] = False

    def __init__(
        self,
        scope: str = "layer",
        refit: bool = False,
        structured: bool = True,
        allocation: str = "uniform",
        refit_ridge: float = 0.0,
        rounds: int = 1,
        refit_to: str = "previous",
        refit_prior: str = "values",
    ):
        if refit_prior not in ("zero", "weights", "values"):
            raise ValueError(
                f"method '{self.name}': refit_prior={refit_prior!r} must be 'zero', 'weights' "
                "or 'values'"
            )
        self.refit_prior = refit_prior
        if refit_to not in ("original", "previous"):
            raise ValueError(
                f"method '{self.name}': refit_to={refit_to!r} must be 'original' or 'previous'"
            )
        self.refit_to = refit_to
        if not rounds >= 1:
            raise ValueError(f"method '{self.name}': rounds={rounds} must be >= 1")
        if rounds > 1 and (self.self_sized or scope == "global"):
            raise ValueError(
                f"method '{self.name}': rounds={rounds} reaches a sparsity in steps per "
                "matrix; it needs scope='layer' and a method that does not size itself"
            )
        self.rounds = int(rounds)
        if not refit_ridge >= 0:
            raise ValueError(f"method '{self.name}': refit_ridge={refit_ridge} must be >= 0")
        self.refit_ridge = float(refit_ridge)
        if allocation not in ("uniform", "curves", "output"):
            raise ValueError(
                f"method '{self.name}': allocation={allocation!r} must be 'uniform', 'curves' or "
                "'output'"
            )
        if allocation != "uniform" and (self.self_sized or scope == "global"):
            raise ValueError(
                f"method '{self.name}': allocation={allocation!r} spreads a sparsity target over "
                "matrices by their error curves; it needs scope='layer' and a method that "
                "does not size itself"
            )
        self.allocation = allocation
        if scope not in self.scopes:
            raise ValueError(
                f"method '{self.name}': scope={scope!r} must be one of {', '.join(self.scopes)}"
            )
        if refit and self.sets_values:
            raise ValueError(
                f"method '{self.name}' computes its own values; refit=True is not needed"
            )
        self.scope = scope
        self.refit = bool(refit)
        self.structured = bool(structured)

    @property
    def needs_statistics(self) -> bool:  # type: ignore[override]
        return self.needs_gram or self.refit

    def solver(self, group: Any, stats: Any, model: nn.Module) -> Any:
        raise TypeError(f"method '{self.name}' sparsifies weights; it has no channel solver")

    # --- per matrix -------------------------------------------------------------------
    def keep(
        self, unit: MatrixUnit, density: float | None, nm: tuple[int, int] | None, rng: Any
    ) -> np.ndarray:
        """The mask for ``unit`` at ``density`` (or the ``n:m`` pattern)."""
        raise NotImplementedError

    def sparsify(
        self, unit: MatrixUnit, density: float | None, nm: tuple[int, int] | None, rng: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(values, keep)`` for one matrix; ``density=None`` with ``self_sized``."""
        keep = self.keep(unit, density, nm, rng)
        return np.where(keep, unit.weight, 0.0), keep

    def sparsify_grid(
        self, unit: MatrixUnit, densities: Sequence[float], rng: Callable[[], Any]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`sparsify` at each of ``densities`` (an error curve); ``rng()`` gives each
        its generator.  Methods whose densities share work override it."""
        return [self.sparsify(unit, float(d), None, rng()) for d in densities]

    def bias_delta(self, unit: MatrixUnit, new: np.ndarray) -> np.ndarray | None:
        """What to add to the module's bias with the new values (``None``: nothing)."""
        return None

    # --- pooled over matrices (scope="global") -----------------------------------------
    def global_scores(self, unit: MatrixUnit) -> np.ndarray:
        """Scores comparable across matrices, for ``scope="global"``."""
        raise NotImplementedError

    def global_density(self, units: list[MatrixUnit]) -> float:
        """For self-sized global methods: the pooled density their rule asks for."""
        raise NotImplementedError


def _scores_keep(
    scores: np.ndarray, density: float | None, nm: tuple[int, int] | None, per_row: bool
) -> np.ndarray:
    if nm is not None:
        return nm_keep(scores, *nm)
    assert density is not None
    if per_row:
        return rows_keep(scores, np.full(scores.shape[0], round(density * scores.shape[1])))
    return magnitude_keep(scores, density)


@register_method("magnitude", kind="weight")
class Magnitude(WeightMethod):
    """Keep the largest ``|w|`` of each matrix (``scope="layer"``), of each row
    (``"row"``) or of the whole model (``"global"``)."""

    scopes = ("layer", "row", "global")

    def keep(self, unit, density, nm, rng):  # type: ignore[no-untyped-def]
        return _scores_keep(np.abs(unit.weight), density, nm, per_row=self.scope == "row")

    def global_scores(self, unit: MatrixUnit) -> np.ndarray:
        return np.abs(unit.weight)


@register_method("random", kind="weight")
class RandomWeights(WeightMethod):
    """A uniformly random mask with the requested share per matrix (the run's ``seed``)."""

    def keep(self, unit, density, nm, rng):  # type: ignore[no-untyped-def]
        return _scores_keep(rng.random(unit.weight.shape), density, nm, per_row=False)


@register_method("wanda", kind="weight")
class Wanda(WeightMethod):
    """Wanda (Sun et al. 2024): ``|w_ij|·‖X_j‖₂`` compared within each output row."""

    needs_gram = True

    def keep(self, unit, density, nm, rng):  # type: ignore[no-untyped-def]
        assert unit.gram is not None
        return _scores_keep(wanda_scores(unit.weight, unit.gram), density, nm, per_row=True)


@register_method("obs", kind="weight")
class OBS(WeightMethod):
    """SparseGPT-style OBS: the column sweep with the damped Gram as Hessian and lazy
    block updates (``blocksize``, ``damp``: relative diagonal damping, 1% as SparseGPT).
    The values are its own updates; ``refit=True`` replaces them by the exact masked
    least squares of the mask it chose."""

    needs_gram = True

    def __init__(
        self,
        scope: str = "layer",
        refit: bool = False,
        structured: bool = True,
        blocksize: int = 128,
        damp: float = 0.01,
        allocation: str = "uniform",
        refit_ridge: float = 0.0,
        rounds: int = 1,
        refit_to: str = "previous",
        refit_prior: str = "values",
    ):
        super().__init__(
            scope, refit, structured, allocation, refit_ridge, rounds, refit_to, refit_prior
        )
        if blocksize < 1:
            raise ValueError(f"method 'obs': blocksize={blocksize} must be >= 1")
        if not damp >= 0:
            raise ValueError(f"method 'obs': damp={damp} must be >= 0")
        self.blocksize, self.damp = int(blocksize), float(damp)

    def sparsify(self, unit, density, nm, rng):  # type: ignore[no-untyped-def]
        assert unit.gram is not None
        return obs_sparsify(
            unit.weight, unit.gram, density, nm, blocksize=self.blocksize, damp=self.damp
        )


@register_method("obc", kind="weight")
class OBC(WeightMethod):
    """Optimal Brain Compression (Frantar & Alistarh 2022): each row pruned one weight at
    a time in the exact greedy OBS order on the damped Gram (``damp``, relative, as
    ``obs``), the removals spread over the rows where they cost least, the values the
    exact optimum for the mask.  Costs ``O(rows·cols³)`` against SparseGPT's
    ``O(cols³)``, and halves the layer's output error of ``obs`` at high sparsity on
    ResNet-20 (docs/sparsify.md).  ``reach``: rows are traced up to that many times the
    mean number of removals."""

    needs_gram = True
    supports_nm = False

    def __init__(
        self,
        scope: str = "layer",
        refit: bool = False,
        structured: bool = True,
        damp: float = 0.01,
        reach: float = 2.0,
        allocation: str = "uniform",
        refit_ridge: float = 0.0,
        rounds: int = 1,
        refit_to: str = "previous",
        refit_prior: str = "values",
    ):
        super().__init__(
            scope, refit, structured, allocation, refit_ridge, rounds, refit_to, refit_prior
        )
        if not damp >= 0:
            raise ValueError(f"method 'obc': damp={damp} must be >= 0")
        if not reach >= 1:
            raise ValueError(f"method 'obc': reach={reach} must be >= 1")
        self.damp, self.reach = float(damp), float(reach)

    def sparsify(self, unit, density, nm, rng):  # type: ignore[no-untyped-def]
        assert unit.gram is not None and density is not None
        return obc_sparsify(unit.weight, unit.gram, density, damp=self.damp, reach=self.reach)

    def sparsify_grid(self, unit, densities, rng):  # type: ignore[no-untyped-def]
        assert unit.gram is not None
        return obc_masks(unit.weight, unit.gram, densities, damp=self.damp, reach=self.reach)


class _Bound(WeightMethod):
    """Shared by ``lq`` and ``pqi``: keep per row / matrix the ℓq-bound count of largest
    weights; with a ``sparsity`` target, ``eta`` is solved for instead."""

    self_sized = True
    supports_nm = False
    p: float
    q: float
    eta: float

    def counts(self, W: np.ndarray, eta: float) -> np.ndarray:
        scope = "layer" if self.scope == "layer" else "row"
        c = pq_keep_counts(W, self.p, self.q, eta, scope=scope)
        return np.asarray(c).reshape(-1)

    def _keep_for(self, W: np.ndarray, eta: float) -> np.ndarray:
        c = self.counts(W, eta)
        if self.scope == "layer":
            return (
                magnitude_keep(W, max(int(c[0]), 1) / W.size) if W.size else np.ones_like(W, bool)
            )
        return rows_keep(np.abs(W), c)

    def solve_eta(self, units: list[MatrixUnit], density: float) -> float:
        """The ``η`` whose bound keeps as many weights as possible, at most ``density`` of
        them (``η < 0``, keeping more than the bound at ``η = 0``, when that is sparser)."""
        total = sum(u.weight.size for u in units)
        want = density * total

        def kept(eta: float) -> float:
            if self.scope == "global":
                pooled = np.concatenate([np.abs(u.weight).ravel() for u in units])[None, :]
                return float(pq_keep_counts(pooled, self.p, self.q, eta, scope="layer"))
            return float(sum(self.counts(u.weight, eta).sum() for u in units))

        if kept(0.0) <= want:
            # the bound at η = 0 is already sparser than asked: −1 < η < 0 keeps more
            lo, hi = -1.0 + 1e-12, 0.0
            if kept(lo) <= want:
                return lo
        else:
            lo, hi = 0.0, 1.0
            while kept(hi) > want and hi < 1e12:
                lo, hi = hi, hi * 4
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if kept(mid) > want else (lo, mid)
        return hi

    def keep(self, unit, density, nm, rng):  # type: ignore[no-untyped-def]
        return self._keep_for(unit.weight, self.eta)

    def global_scores(self, unit: MatrixUnit) -> np.ndarray:
        return np.abs(unit.weight)

    def global_density(self, units: list[MatrixUnit]) -> float:
        pooled = np.concatenate([np.abs(u.weight).ravel() for u in units])[None, :]
        r = pq_keep_counts(pooled, self.p, self.q, self.eta, scope="layer")
        return max(float(r) / pooled.size, 1.0 / pooled.size)


@register_method("lq", kind="weight")
class Lq(_Bound):
    """Paper 3's ABP-M: per neuron with ``d`` remaining weights and ``SI = M₁/M_q``, keep
    the ``r = ⌈d·SI^{−q/(1−q)}·(1+η)^{−1/(1−q)}⌉`` largest ``|w|``; inputs that no kept
    neuron uses are then removed (the backward traversal's structured effect)."""

    scopes = ("neuron",)

    def __init__(
        self,
        q: float = 0.5,
        eta: float = 0.0,
        scope: str = "neuron",
        refit: bool = False,
        structured: bool = True,
        refit_ridge: float = 0.0,
        refit_prior: str = "values",
    ):
        super().__init__(scope, refit, structured, refit_ridge=refit_ridge, refit_prior=refit_prior)
        if not 0.0 < q < 1.0:
            raise ValueError(f"method 'lq': q={q} must be in (0, 1)")
        if not eta > -1.0:
            raise ValueError(f"method 'lq': eta={eta} must be > -1")
        self.p, self.q, self.eta = float(q), 1.0, float(eta)


@register_method("pqi", kind="weight")
class PQI(_Bound):
    """The one-shot PQ-index bound (Diao et al. 2023, Theorem 2) with ``(p, q, η)``: keep
    ``⌈d (1+η)^{−q/(q−p)} (1 − I_{p,q})^{qp/(q−p)}⌉`` largest weights per neuron, matrix
    or the whole model (``scope``)."""

    scopes = ("neuron", "layer", "global")

    def __init__(
        self,
        p: float = 0.5,
        q: float = 1.0,
        eta: float = 0.0,
        scope: str = "layer",
        refit: bool = False,
        structured: bool = True,
        refit_ridge: float = 0.0,
        refit_prior: str = "values",
    ):
        super().__init__(scope, refit, structured, refit_ridge=refit_ridge, refit_prior=refit_prior)
        if not 0.0 < p < q:
            raise ValueError(f"method 'pqi': needs 0 < p < q, got p={p}, q={q}")
        if not eta > -1.0:
            raise ValueError(f"method 'pqi': eta={eta} must be > -1")
        self.p, self.q, self.eta = float(p), float(q), float(eta)


@register_method("lq-lasso", kind="weight")
class LqLasso(WeightMethod):
    """Paper 3's ABP-L: each neuron's output on the calibration data is refit by
    ℓ1-penalised least squares (penalty ``lam``, the lasso's ``(1/2n)‖·‖² + λ‖w‖₁`` on the
    layer's raw inputs, free intercept) on the previous layer's outputs, from the centred
    Gram; the non-zeros it keeps are the mask.  Inputs no kept neuron selects are removed.
    With a ``sparsity`` target, ``lam`` is solved per layer by bisection instead;
    ``debias=True`` refits the kept weights by least squares (the relaxed lasso)."""

    needs_gram = True
    needs_mean = True
    self_sized = True
    supports_nm = False
    sets_values = True

    def __init__(
        self, lam: float = 1e-4, debias: bool = False, scope: str = "layer", structured: bool = True
    ):
        super().__init__(scope, False, structured)
        if not lam >= 0:
            raise ValueError(f"method 'lq-lasso': lam={lam} must be >= 0")
        self.lam = float(lam)
        self.debias = bool(debias)

    @staticmethod
    def covariance(unit: MatrixUnit) -> np.ndarray:
        assert unit.gram is not None and unit.mean is not None and unit.rows > 0
        mu = unit.mean
        return unit.gram / unit.rows - np.outer(mu, mu)

    def sparsify(self, unit, density, nm, rng):  # type: ignore[no-untyped-def]
        cov = self.covariance(unit)
        if density is None:
            w = lasso_rows(unit.weight, cov, self.lam)
        else:
            w = self._at_density(unit.weight, cov, density)
        keep = w != 0
        if self.debias and keep.any():
            # the relaxed lasso: least squares (free intercept) on the lasso's support
            w = masked_refit(unit.weight, cov, keep)
        return w, keep

    @staticmethod
    def _at_density(W: np.ndarray, cov: np.ndarray, density: float) -> np.ndarray:
        """The lasso whose penalty (bisected on a log scale) keeps at most ``density``."""
        # above λ_max = max|Σ w₀| every coefficient is zero
        lam_max = float(np.abs(W @ cov).max()) or 1.0
        lo, hi = np.log(lam_max * 1e-9), np.log(lam_max)
        best = np.zeros_like(W)
        for _ in range(24):
            mid = 0.5 * (lo + hi)
            w = lasso_rows(W, cov, float(np.exp(mid)), max_sweeps=200, tol=1e-6)
            if np.count_nonzero(w) > density * W.size:
                lo = mid
            else:
                hi, best = mid, w
        return best

    def bias_delta(self, unit: MatrixUnit, new: np.ndarray) -> np.ndarray | None:
        """``μᵀ(w₀ − w)`` per row: the intercept change of the lasso with a free intercept."""
        assert unit.mean is not None
        return (unit.weight - new) @ unit.mean


@register_method("spectrum", kind="weight")
class Spectrum(WeightMethod):
    """Spectrum-preserving sparsification (Paper 4, our reading of papers §5.2): the
    ``det_fraction`` share of each matrix's budget kept as its largest entries, the rest
    sampled with probability ∝ ``|w|`` (``distribution="l1"``), ``w²`` (``"l2"``) or the
    ℓ1/ℓ2 ``"hybrid"``, rescaled by ``1/p`` (``rescale``) so the sample is unbiased."""

    supports_nm = False
    sets_values = True

    def __init__(
        self,
        det_fraction: float = 0.5,
        distribution: str = "l1",
        rescale: bool = True,
        scope: str = "layer",
        structured: bool = True,
        allocation: str = "uniform",
    ):
        super().__init__(scope, False, structured, allocation)
        if not 0.0 <= det_fraction <= 1.0:
            raise ValueError(f"method 'spectrum': det_fraction={det_fraction} must be in [0, 1]")
        if distribution not in ("l1", "l2", "hybrid"):
            raise ValueError(
                f"method 'spectrum': distribution={distribution!r} must be 'l1', 'l2' or 'hybrid'"
            )
        self.det_fraction, self.distribution, self.rescale = (
            float(det_fraction),
            distribution,
            bool(rescale),
        )

    def sparsify(self, unit, density, nm, rng):  # type: ignore[no-untyped-def]
        assert density is not None
        return spectrum_sparsify(
            unit.weight,
            density,
            det_fraction=self.det_fraction,
            distribution=self.distribution,
            rescale=self.rescale,
            rng=rng,
        )


def refit_values(
    unit: MatrixUnit,
    keep: np.ndarray,
    ridge: float = 0.0,
    prior: str = "values",
    values: np.ndarray | None = None,
) -> np.ndarray:
    """Masked least squares of the kept weights (see :func:`masked_refit`): exact, or with
    a relative ridge ``ridge·mean(diag G)`` (the method's ``refit_ridge``) that pulls the
    refit, where the calibration rows underdetermine it, towards zero (``prior="zero"``),
    towards the weights it starts from (``"weights"``: the original, or the last round's
    values) or towards the method's own ``values`` (``"values"``: e.g. OBS's updated
    weights; for a mask-only method the same as ``"weights"``).  The method's
    ``refit_prior``."""
    assert unit.gram is not None
    start = None
    if ridge > 0 and prior == "weights":
        start = unit.weight
    elif ridge > 0 and prior == "values":
        start = unit.weight if values is None else values
    return masked_refit(
        unit.weight, unit.gram, keep, unit.cross, damp=max(ridge, 1e-8), prior=start
    )


def pooled_keep(
    method: WeightMethod, units: list[MatrixUnit], density: float
) -> dict[str, np.ndarray]:
    """``scope="global"``: one threshold on the method's scores over every matrix."""
    scores = {u.name: method.global_scores(u) for u in units}
    thr = global_threshold(list(scores.values()), density)
    keep = {
        n: s >= thr if np.isfinite(thr) else np.full(s.shape, thr < 0) for n, s in scores.items()
    }
    # ties at the threshold can overshoot; drop the surplus deterministically
    total = sum(s.size for s in scores.values())
    surplus = sum(int(k.sum()) for k in keep.values()) - round(density * total)
    for n in scores:
        if surplus <= 0:
            break
        at = np.flatnonzero((scores[n] == thr).ravel() & keep[n].ravel())
        drop = at[:surplus]
        flat = keep[n].ravel()
        flat[drop] = False
        keep[n] = flat.reshape(scores[n].shape)
        surplus -= drop.size
    return keep
