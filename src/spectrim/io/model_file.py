"""Load a user's own model file: TorchScript or a fully pickled ``nn.Module``.

Example::

    >>> import tempfile, torch
    >>> from torch import nn
    >>> path = tempfile.mktemp(suffix=".pt")
    >>> torch.save(nn.Linear(4, 2), path)
    >>> load_model_file(path).out_features
    2
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectrim.io.torchscript import TorchScriptConversionError, script_to_module

__all__ = ["ModelFileError", "is_torchscript_file", "load_model_file"]

_CHECKPOINT_KEYS = ("model", "module", "net", "network")


class ModelFileError(ValueError):
    """A model file cannot be read as a model."""


def is_torchscript_file(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a TorchScript archive (``torch.jit.save``)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def load_model_file(path: str | os.PathLike[str], example_inputs: Any | None = None) -> nn.Module:
    """Load a model saved with ``torch.jit.save`` (TorchScript) or ``torch.save(model)``.

    TorchScript modules are rebuilt as editable eager modules
    (:func:`~spectrim.io.torchscript.script_to_module`), checked on ``example_inputs`` when
    given. Pickled modules are unpickled with ``weights_only=False``: only load files you
    trust. A checkpoint dict holding the module under ``"model"``/``"module"``/``"net"`` is
    accepted too; a bare state dict is not (it has no architecture).

    Raises:
        FileNotFoundError: no such file.
        ModelFileError: the file holds no model (the message names the file and why).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"model file {p} not found")
    if is_torchscript_file(p):
        try:
            with warnings.catch_warnings():  # torch.jit.load's deprecation notice
                warnings.simplefilter("ignore", FutureWarning)
                scripted = torch.jit.load(str(p), map_location="cpu")
        except Exception as exc:
            raise ModelFileError(f"{p}: cannot load the TorchScript archive ({exc})") from None
        try:
            return script_to_module(scripted, example_inputs)
        except TorchScriptConversionError as exc:
            raise ModelFileError(f"{p}: TorchScript model: {exc}") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(
            f"{p} is neither a TorchScript archive nor a pickled nn.Module ({first})"
        ) from None
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        for key in _CHECKPOINT_KEYS:
            if isinstance(obj.get(key), nn.Module):
                return obj[key]  # type: ignore[no-any-return]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ModelFileError(
                f"{p} holds a state dict (weights only), not a model: save the whole module "
                "with torch.save(model) or torch.jit.save(torch.jit.script(model)), or use a "
                "zoo model name"
            )
    raise ModelFileError(
        f"{p} holds a {type(obj).__name__}, not an nn.Module; save the model with "
        "torch.save(model) or torch.jit.save"
    )
