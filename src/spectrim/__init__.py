"""spectrim: make trained networks smaller while preserving what they compute.

Example::

    >>> import torch, torch.nn as nn, spectrim
    >>> net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    >>> small, report = spectrim.compress(net, torch.randn(256, 8), method="id", target="macs=0.5")
    >>> report.macs_after <= 0.5 * report.macs_before
    True
"""

from spectrim.api import as_batches, compress, inputs_only
from spectrim.config import CompressConfig, Target
from spectrim.diagnostics import CompressibilityReport, analyze
from spectrim.methods import available as available_methods
from spectrim.repair import RepairConfig, RepairReport, repair
from spectrim.report import CompressionReport, GroupReport

__version__ = "0.1.0"

__all__ = [
    "CompressConfig",
    "CompressibilityReport",
    "CompressionReport",
    "GroupReport",
    "RepairConfig",
    "RepairReport",
    "Target",
    "__version__",
    "analyze",
    "as_batches",
    "available_methods",
    "compress",
    "inputs_only",
    "repair",
]
