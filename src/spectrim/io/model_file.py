"""Load a user's own model file: TorchScript, or (when trusted) a pickled ``nn.Module``.

Example::

    >>> import tempfile, torch
    >>> from torch import nn
    >>> path = tempfile.mktemp(suffix=".pt")
    >>> torch.save(nn.Linear(4, 2), path)
    >>> load_model_file(path, trust_pickle=True).out_features
    2
"""

from __future__ import annotations

import os
import pickle
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


def load_model_file(
    path: str | os.PathLike[str],
    example_inputs: Any | None = None,
    *,
    trust_pickle: bool = False,
) -> nn.Module:
    """Load a model saved with ``torch.jit.save`` (TorchScript) or ``torch.save(model)``.

    TorchScript modules are rebuilt as editable eager modules
    (:func:`~spectrim.io.torchscript.script_to_module`), checked on ``example_inputs`` when
    given; loading them unpickles nothing. A pickled module (``torch.save(model)``) can run
    any code while it is unpickled, so it is refused unless ``trust_pickle=True``
    (``--trust-pickle`` on the command line): only pass it for files you trust. A
    checkpoint dict holding the module under ``"model"``/``"module"``/``"net"`` is accepted
    too; a bare state dict is not (it has no architecture), and is recognised without
    unpickling anything but tensors.

    Raises:
        FileNotFoundError: no such file.
        ModelFileError: the file holds no model, or a pickle without ``trust_pickle`` (the
            message names the file and why).
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
        obj = torch.load(p, map_location="cpu", weights_only=True)  # tensors only, no code
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # not a pickle of Python objects
            raise ModelFileError(_not_a_model(p, exc)) from None
        if not trust_pickle:
            raise ModelFileError(
                f"{p} is a pickled Python object (torch.save(model)): unpickling it runs code "
                "from the file, so spectrim does not load it by default. If you trust the "
                "file, pass trust_pickle=True (--trust-pickle on the command line); or save "
                "the model as TorchScript: torch.jit.save(torch.jit.script(model), path)"
            ) from None
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise ModelFileError(_not_a_model(p, exc2)) from None
    except Exception as exc:
        raise ModelFileError(_not_a_model(p, exc)) from None
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        for key in _CHECKPOINT_KEYS:
            if isinstance(obj.get(key), nn.Module):
                return obj[key]  # type: ignore[no-any-return]
        inner = obj.get("state_dict", obj)
        if (
            isinstance(inner, Mapping)
            and inner
            and all(isinstance(v, torch.Tensor) for v in inner.values())
        ):
            raise ModelFileError(
                f"{p} holds a state dict (weights only), not a model: save the whole module "
                "with torch.save(model) or torch.jit.save(torch.jit.script(model)), or use a "
                "zoo model name"
            )
    raise ModelFileError(
        f"{p} holds a {type(obj).__name__}, not an nn.Module; save the model with "
        "torch.save(model) or torch.jit.save"
    )


def _not_a_model(p: Path, exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    first = first.split(". ")[0].rstrip(".")  # torch appends paragraphs of advice
    return f"{p} is neither a TorchScript archive nor a pickled nn.Module ({first})"
