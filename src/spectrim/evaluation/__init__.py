"""Evaluation of compressed models: cost (MACs, parameters), accuracy/fidelity and latency.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from spectrim.evaluation import count_macs, evaluate
    >>> model = nn.Linear(4, 2)
    >>> count_macs(model, torch.randn(1, 4))
    8
    >>> evaluate(model, torch.randn(16, 4), reference=model).agreement
    1.0
"""

from spectrim.evaluation.flops import ModelCost, count_macs, count_params, profile
from spectrim.evaluation.latency import LatencyResult, compare_latency, measure_latency
from spectrim.evaluation.metrics import (
    EvalResult,
    accuracy,
    agreement,
    embedding_fidelity,
    evaluate,
    is_causal_lm,
    language_model_fidelity,
    output_fidelity,
    predict,
)

__all__ = [
    "EvalResult",
    "LatencyResult",
    "ModelCost",
    "accuracy",
    "agreement",
    "compare_latency",
    "count_macs",
    "count_params",
    "embedding_fidelity",
    "evaluate",
    "is_causal_lm",
    "language_model_fidelity",
    "measure_latency",
    "output_fidelity",
    "predict",
    "profile",
]
