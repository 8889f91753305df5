"""Save and reload compressed models with a shape manifest (timm-style).

A compressed model has the same Python classes as the original but narrower layers, so its
``state_dict`` does not load into a freshly built original. The manifest records what surgery
changed: the shape of every tensor in the state dict and the size attributes of the layers
(``in_channels``, ``out_features``, ``num_features``, ...). Reloading builds the original
architecture, shrinks it to the manifest (empty tensors of the recorded shapes, attributes
set), then loads the weights with ``strict=True``.

Directory layout written by :func:`save_compressed`::

    out/
      state_dict.pt    # torch.save(model.state_dict())
      manifest.json    # {"format": "spectrim-manifest/1", "shapes", "modules", "arch", ...}
      report.json      # the CompressionReport, when given

``arch`` tells :func:`load_compressed` how to build the original architecture when no
``base_model`` is passed: ``{"zoo": "resnet56-cifar10"}`` (``spectrim.zoo.get_model`` without
weights), ``{"file": "/path/model.pt"}`` (:func:`~spectrim.io.load_model_file`) or
``{"class": "pkg.module.Class", "kwargs": {...}}``.

Example::

    >>> import tempfile, torch, spectrim
    >>> from torch import nn
    >>> from spectrim.io import load_compressed, save_compressed
    >>> net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    >>> small, report = spectrim.compress(net, torch.randn(128, 8), target="width=0.5")
    >>> folder = tempfile.mkdtemp()
    >>> _ = save_compressed(small, folder, report)
    >>> base = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    >>> load_compressed(folder, base_model=base)[0].out_features
    16
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectrim.report import CompressionReport

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "REPORT_FILE",
    "STATE_FILE",
    "ManifestError",
    "apply_manifest",
    "build_arch",
    "build_manifest",
    "dump_manifest",
    "load_compressed",
    "read_manifest",
    "save_compressed",
]

MANIFEST_FORMAT = "spectrim-manifest/1"
STATE_FILE = "state_dict.pt"
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.json"

_CONV = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

#: Size attributes recorded per module type (the ones channel surgery can change).
SIZE_ATTRIBUTES: tuple[tuple[tuple[type[nn.Module], ...], tuple[str, ...]], ...] = (
    (_CONV, ("in_channels", "out_channels", "groups")),
    ((nn.Linear,), ("in_features", "out_features")),
    ((nn.modules.batchnorm._NormBase,), ("num_features",)),  # BatchNorm*, InstanceNorm*
    ((nn.Embedding,), ("embedding_dim",)),
    ((nn.PReLU,), ("num_parameters",)),
    ((nn.LayerNorm,), ("normalized_shape",)),
    ((nn.GroupNorm,), ("num_groups", "num_channels")),
)


class ManifestError(ValueError):
    """A manifest is malformed or does not match the model or the saved weights."""


def _size_attributes(module: nn.Module) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for types, attrs in SIZE_ATTRIBUTES:
        if isinstance(module, types):
            for attr in attrs:
                value = getattr(module, attr, None)
                if isinstance(value, bool) or value is None:
                    continue
                if isinstance(value, int):
                    out[attr] = value
                elif isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
                    out[attr] = list(value)
    return out


def build_manifest(model: nn.Module, arch: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of ``model``: state-dict shapes, layer size attributes and ``arch``.

    Example::

        >>> build_manifest(nn.Linear(3, 2))["modules"]
        {'': {'in_features': 3, 'out_features': 2}}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    shapes = {
        name: [int(s) for s in t.shape]
        for name, t in model.state_dict(keep_vars=True).items()
        if isinstance(t, torch.Tensor)
    }
    modules = {}
    for name, module in model.named_modules():
        attrs = _size_attributes(module)
        if attrs:
            modules[name] = attrs
    from spectrim import __version__

    return {
        "format": MANIFEST_FORMAT,
        "shapes": shapes,
        "modules": modules,
        "arch": dict(arch) if arch is not None else None,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "spectrim_version": __version__,
        "torch_version": torch.__version__,
    }


def _where(source: str | os.PathLike[str] | None) -> str:
    return f"{source}: " if source is not None else "manifest: "


def _validate(manifest: Any, source: str | os.PathLike[str] | None) -> dict[str, Any]:
    where = _where(source)
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}expected a JSON object, got {type(manifest).__name__}")
    fmt = manifest.get("format")
    if fmt != MANIFEST_FORMAT:
        raise ManifestError(
            f"{where}unsupported format {fmt!r} (expected {MANIFEST_FORMAT!r}); "
            "was this directory written by spectrim.io.save_compressed?"
        )
    shapes = manifest.get("shapes")
    if not isinstance(shapes, dict):
        raise ManifestError(f"{where}'shapes' must be an object of name -> list of ints")
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise ManifestError(
                f"{where}shape of {name!r} must be a list of non-negative ints, got {shape!r}"
            )
    modules = manifest.get("modules", {})
    if not isinstance(modules, dict) or not all(isinstance(v, dict) for v in modules.values()):
        raise ManifestError(f"{where}'modules' must be an object of module name -> attributes")
    arch = manifest.get("arch")
    if arch is not None and not isinstance(arch, dict):
        raise ManifestError(f"{where}'arch' must be an object or null, got {arch!r}")
    return manifest


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``manifest.json`` of a directory written by :func:`save_compressed`."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a directory written by save_compressed"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    return _validate(manifest, path)


def _owner(model: nn.Module, name: str, where: str) -> tuple[nn.Module, str]:
    module_name, _, leaf = name.rpartition(".")
    try:
        return model.get_submodule(module_name), leaf
    except AttributeError:
        raise ManifestError(
            f"{where}tensor {name!r}: the model ({type(model).__name__}) has no submodule "
            f"{module_name!r}; is the base model the architecture that was compressed?"
        ) from None


def apply_manifest(
    model: nn.Module,
    manifest: Mapping[str, Any],
    *,
    source: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Reshape ``model`` (in place) to the manifest; return it.

    Every tensor listed under ``"shapes"`` whose shape differs is replaced by an uninitialised
    tensor of the recorded shape (same dtype, device, parameter-ness and ``requires_grad``;
    tied tensors stay tied), and every attribute under ``"modules"`` is set. Load the weights
    afterwards with ``model.load_state_dict(state, strict=True)``.

    Raises:
        ManifestError: malformed manifest, or a name the model does not have. ``source``
            (e.g. the manifest path) prefixes the messages.
    """
    manifest = _validate(dict(manifest), source)
    where = _where(source)
    for module_name, attrs in manifest.get("modules", {}).items():
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise ManifestError(
                f"{where}module {module_name!r} is not in the model ({type(model).__name__}); "
                "is the base model the architecture that was compressed?"
            ) from None
        for attr, value in attrs.items():
            if not hasattr(module, attr):
                raise ManifestError(
                    f"{where}module {module_name!r} ({type(module).__name__}) has no "
                    f"attribute {attr!r}"
                )
            current = getattr(module, attr)
            if isinstance(current, tuple) and isinstance(value, list):
                value = tuple(value)
            setattr(module, attr, value)

    replaced: dict[int, torch.Tensor] = {}
    for name, shape in manifest["shapes"].items():
        owner, leaf = _owner(model, name, where)
        old: torch.Tensor | None
        if leaf in owner._parameters:
            old = owner._parameters[leaf]
        elif leaf in owner._buffers:
            old = owner._buffers[leaf]
        else:
            raise ManifestError(
                f"{where}tensor {name!r} is neither a parameter nor a buffer of the model "
                f"({type(owner).__name__} at {name.rpartition('.')[0]!r})"
            )
        if old is None or list(old.shape) == shape:
            continue
        new = replaced.get(id(old))
        if new is None:
            data = torch.empty(shape, dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                new = nn.Parameter(data, requires_grad=old.requires_grad)
            else:
                new = data
            replaced[id(old)] = new
        if leaf in owner._parameters:
            owner._parameters[leaf] = new  # type: ignore[assignment]
        else:
            owner._buffers[leaf] = new
    return model


def _import_object(path: str) -> Any:
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise ImportError(f"cannot import {path!r}")


def build_arch(arch: Mapping[str, Any] | None, *, source: str | None = None) -> nn.Module:
    """Build the original (uncompressed) architecture described by a manifest's ``arch``.

    ``{"zoo": name}``: :func:`spectrim.zoo.get_model` without pretrained weights;
    ``{"file": path}``: :func:`spectrim.io.load_model_file`;
    ``{"class": "pkg.module.Class", "kwargs": {...}}``: ``Class(**kwargs)``.
    """
    where = _where(source)
    if not arch:
        raise ManifestError(
            f"{where}no 'arch' recorded, so the original architecture is unknown; "
            "pass base_model= (the uncompressed model or a fresh instance of its class)"
        )
    if "zoo" in arch:
        from spectrim.zoo import get_model

        return get_model(str(arch["zoo"]), pretrained=False)
    if "file" in arch:
        from spectrim.io.model_file import load_model_file

        return load_model_file(arch["file"])
    if "class" in arch:
        try:
            cls = _import_object(str(arch["class"]))
        except ImportError as exc:
            raise ManifestError(f"{where}arch class: {exc}") from None
        kwargs = arch.get("kwargs") or {}
        model = cls(**kwargs)
        if not isinstance(model, nn.Module):
            raise ManifestError(f"{where}arch class {arch['class']!r} did not build an nn.Module")
        return model
    raise ManifestError(
        f"{where}arch {dict(arch)!r} names no 'zoo', 'file' or 'class'; pass base_model="
    )


def dump_manifest(manifest: Mapping[str, Any]) -> str:
    """JSON text of a manifest, one tensor or module per line (diff-friendly, compact)."""

    def compact(value: Any) -> str:
        return json.dumps(value, separators=(", ", ": "))

    lines = ["{"]
    items = list(manifest.items())
    for i, (key, value) in enumerate(items):
        tail = "," if i < len(items) - 1 else ""
        if isinstance(value, dict) and value and key in ("shapes", "modules"):
            lines.append(f"  {json.dumps(key)}: {{")
            entries = list(value.items())
            for j, (name, entry) in enumerate(entries):
                sep = "," if j < len(entries) - 1 else ""
                lines.append(f"    {json.dumps(name)}: {compact(entry)}{sep}")
            lines.append(f"  }}{tail}")
        else:
            lines.append(f"  {json.dumps(key)}: {compact(value)}{tail}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def save_compressed(
    model: nn.Module,
    directory: str | os.PathLike[str],
    report: CompressionReport | Mapping[str, Any] | None = None,
    arch: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``state_dict.pt``, ``manifest.json`` (and ``report.json``) to ``directory``.

    Args:
        model: the compressed model.
        directory: output folder (created if needed; existing files are overwritten).
        report: the :class:`~spectrim.report.CompressionReport` (or its dict), saved as JSON.
        arch: how to rebuild the original architecture, e.g. ``{"zoo": "resnet56-cifar10"}``
            (see :func:`build_arch`); without it :func:`load_compressed` needs ``base_model``.

    Returns:
        The directory.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    manifest = build_manifest(model, arch)
    torch.save(model.state_dict(), out / STATE_FILE)
    (out / MANIFEST_FILE).write_text(dump_manifest(manifest), encoding="utf-8")
    if report is not None:
        data = report.to_dict() if isinstance(report, CompressionReport) else dict(report)
        (out / REPORT_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return out


def load_compressed(
    directory: str | os.PathLike[str],
    base_model: nn.Module | None = None,
    *,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed`, in eval mode.

    Args:
        directory: the folder written by :func:`save_compressed`.
        base_model: the original architecture (e.g. ``get_model(name, pretrained=False)``);
            it is reshaped and loaded **in place**. Default: built from the manifest's
            ``arch`` (:func:`build_arch`).
        map_location: where to load the weights.

    Raises:
        FileNotFoundError: a file is missing.
        ManifestError: the manifest is malformed or does not fit the model or the weights.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory (expected a save_compressed folder)")
    manifest = read_manifest(folder)
    manifest_path = folder / MANIFEST_FILE
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path} not found")
    model = (
        base_model
        if base_model is not None
        else build_arch(manifest.get("arch"), source=str(manifest_path))
    )
    apply_manifest(model, manifest, source=manifest_path)
    try:
        state = torch.load(state_path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ManifestError(f"{state_path}: cannot read the weights ({exc})") from None
    if not isinstance(state, Mapping):
        raise ManifestError(f"{state_path}: expected a state dict, got {type(state).__name__}")
    expected = model.state_dict(keep_vars=True)
    for name, tensor in state.items():
        if name in expected and isinstance(tensor, torch.Tensor):
            have = expected[name]
            if isinstance(have, torch.Tensor) and have.shape != tensor.shape:
                raise ManifestError(
                    f"{state_path}: tensor {name!r} has shape {list(tensor.shape)} but "
                    f"{manifest_path} and the model give {list(have.shape)}"
                )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise ManifestError(
            f"{state_path} does not match the model ({type(model).__name__}): " + "; ".join(parts)
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ManifestError(f"{state_path}: {exc}") from None
    return model.eval()
