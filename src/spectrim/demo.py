"""A one-minute, offline demonstration: train a small CNN, compress it with every method.

The :class:`~spectrim.zoo.DigitsCNN` is trained on the scikit-learn 8×8 digits (bundled with
scikit-learn, so no download and no ``SPECTRIM_DATA`` are needed), then compressed with each
registered method at each MAC target, with 500 unlabelled training images as calibration data,
and evaluated on the 500 test images against the original model.

Example::

    >>> from spectrim.demo import run_demo
    >>> rows = run_demo(targets=("macs=0.5",))  # doctest: +SKIP
    DigitsCNN on scikit-learn digits: trained in 4.1 s, test accuracy 0.986 ...
    >>> {r["method"]: r["accuracy_after"] for r in rows}  # doctest: +SKIP
    {'id': 0.984, 'l1': 0.928, 'l2': 0.858, 'random': 0.638}

Or from the shell: ``spectrim demo`` (``--quick`` for one target).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from spectrim.api import compress
from spectrim.config import Target
from spectrim.evaluation import evaluate, profile
from spectrim.methods import available

__all__ = ["DEFAULT_TARGETS", "format_row", "run_demo"]

DEFAULT_TARGETS: tuple[str, ...] = ("macs=0.75", "macs=0.5", "macs=0.35")

_HEADER = (
    f"{'method':<8} {'target':<10} {'params':>16} {'MACs':>18} "
    f"{'acc before':>10} {'acc after':>9} {'agree':>6} {'seconds':>7}"
)


def format_row(row: dict[str, Any]) -> str:
    """One line of the demo table."""
    params = f"{row['params_after']:,} ({row['params_ratio']:.2f})"
    macs = f"{row['macs_after']:,} ({row['macs_ratio']:.2f})"
    return (
        f"{row['method']:<8} {row['target']:<10} {params:>16} {macs:>18} "
        f"{row['accuracy_before']:>10.3f} {row['accuracy_after']:>9.3f} "
        f"{row['agreement']:>6.3f} {row['seconds']:>7.2f}"
    )


def run_demo(
    methods: Iterable[str] | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 0,
    *,
    calib_size: int = 500,
    file: TextIO | None = None,
) -> list[dict[str, Any]]:
    """Train the digits CNN, compress it with each method at each target, print a table.

    Args:
        methods: method names (default: every registered method, ``spectrim.methods.available()``).
        targets: compression targets, e.g. ``("macs=0.5",)``.
        seed: seed for training and for randomised methods.
        calib_size: number of (unlabelled) training images used for calibration.
        file: where to print the table (default ``sys.stdout``; ``None`` prints there).

    Returns:
        One dict per (target, method): ``method``, ``target``, ``params_before``,
        ``params_after``, ``params_ratio``, ``macs_before``, ``macs_after``, ``macs_ratio``,
        ``accuracy_before``, ``accuracy_after``, ``agreement``, ``rel_l2`` (logit error
        relative to the original), ``seconds`` (compression time) and ``train_seconds``.
    """
    from spectrim.zoo import train_digits_cnn

    out = file if file is not None else sys.stdout
    names = list(available("channel") if methods is None else methods)
    known = available()
    for name in names:
        if name not in known:
            raise ValueError(f"unknown method {name!r}; available: {', '.join(known)}")
    parsed = [str(Target.parse(t)) for t in targets]
    if not names or not parsed:
        raise ValueError("run_demo needs at least one method and one target")
    if calib_size < 1:
        raise ValueError(f"calib_size must be positive, got {calib_size}")

    t0 = time.perf_counter()
    model, train_set, test_set = train_digits_cnn(seed=seed)
    train_seconds = time.perf_counter() - t0
    x_test = test_set.tensors[0]
    base = evaluate(model, test_set)
    cost = profile(model, x_test[:2])
    accuracy_before = float(base.accuracy if base.accuracy is not None else float("nan"))
    calibration = train_set.tensors[0][:calib_size]

    print(
        f"DigitsCNN on scikit-learn digits: trained in {train_seconds:.1f} s, test accuracy "
        f"{accuracy_before:.3f} on {base.n} images, {cost.params:,} params, "
        f"{cost.macs:,} MACs per image; calibration: {len(calibration)} unlabelled images",
        file=out,
    )
    print(_HEADER, file=out)
    print("-" * len(_HEADER), file=out, flush=True)
    rows: list[dict[str, Any]] = []
    for target in parsed:
        for method in names:
            small, report = compress(model, calibration, method=method, target=target, seed=seed)
            result = evaluate(small, test_set, reference=model)
            row = {
                "method": method,
                "target": target,
                "params_before": report.params_before,
                "params_after": report.params_after,
                "params_ratio": report.params_ratio,
                "macs_before": report.macs_before,
                "macs_after": report.macs_after,
                "macs_ratio": report.macs_ratio,
                "accuracy_before": accuracy_before,
                "accuracy_after": float(result.accuracy)
                if result.accuracy is not None
                else float("nan"),
                "agreement": float(result.agreement)
                if result.agreement is not None
                else float("nan"),
                "rel_l2": (result.fidelity or {}).get("rel_l2", float("nan")),
                "seconds": report.seconds,
                "train_seconds": train_seconds,
            }
            rows.append(row)
            print(format_row(row), file=out, flush=True)
    return rows
