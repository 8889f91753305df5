"""Writing a benchmark's JSON: the machine, the command line, the payload, atomically."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from spectrim._files import atomic_write_text


def save_result(out: str | Path, payload: dict[str, Any], threads: int) -> Path:
    """Write ``payload`` with ``machine`` and ``command`` to ``out``; return the path."""
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": threads,
            "torch": torch.__version__,
        },
        "command": " ".join(sys.argv),
        **payload,
    }
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2, default=float))
    print("wrote", path)
    return path


def compress(*args: Any, **kwargs: Any) -> Any:
    """``spectrim.compress`` with ``sequential_fit="inputs"`` unless the call names one.

    The CNN benchmarks' numbers in docs/results.md were measured with the channel
    interpolation, the library's default until ``"auto"`` (the residual output fit for
    convolutions) replaced it; they call this so their commands still reproduce those
    tables.  ``levers.py --levers residual`` and ``side_by_side.py --spectrim
    spectral+residual`` measure the output fits.
    """
    import spectrim

    kwargs.setdefault("sequential_fit", "inputs")
    return spectrim.compress(*args, **kwargs)
