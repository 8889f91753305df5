"""Save and reload compressed models: safetensors weights plus a shape manifest (timm-style).

A compressed model has the same Python classes as the original but narrower layers, so its
``state_dict`` does not load into a freshly built original. The manifest records what surgery
changed: the shape of every tensor in the state dict and the size attributes of the layers
(``in_channels``, ``out_features``, ``num_features``, ...). Reloading builds the original
architecture, shrinks it to the manifest (empty tensors of the recorded shapes, attributes
set), then loads the weights with ``strict=True``.

Folder layout written by :func:`save_compressed`::

    out/
      model.safetensors  # the weights (tensors only: loading them runs no code)
      manifest.json      # {"format": "spectrim-manifest/2", "shapes", "modules", "arch",
                         #  "tied", "files": {name: {"sha256", "bytes"}}, ...}
      report.json        # the CompressionReport, when given
      original.pt        # a copy of the original model file, when the model came from one

**What is verified.** The manifest records the sha256 and size of every other file in the
folder, and :func:`load_compressed` checks them before it reads anything: a truncated,
bit-flipped or swapped weight file is refused with the file and both hashes. The folder is
written atomically (a temporary sibling renamed into place), so a save that is interrupted
leaves the previous folder intact, never new weights beside an old manifest.

**What never runs code.** Weights are safetensors; the manifest is JSON. ``arch`` tells
:func:`load_compressed` how to build the original architecture when no ``base_model`` is
passed, and only these forms are built by default:

* ``{"zoo": "resnet56-cifar10"}``: :func:`spectrim.zoo.get_model` without weights;
* ``{"torchvision": "resnet18", "kwargs": {...}}``: ``torchvision.models.get_model``;
* ``{"timm": "resnet18", "kwargs": {...}}``: ``timm.create_model(pretrained=False)``;
* ``{"transformers": "AutoModel", "config": {...}}``: a ``transformers`` auto class
  ``from_config`` (no remote code);
* ``{"class": "pkg.module.Class", "kwargs": {...}}``: ``Class(**kwargs)`` for an
  ``nn.Module`` class of spectrim, ``torchvision.models``, ``timm`` or ``transformers``, or
  one the caller passes in ``classes=``; nothing else is even imported;
* ``{"file": "original.pt"}``: the model file copied into the folder, when it is a
  TorchScript archive.

A pickled model file (``torch.save(model)``) or any other class runs code when it is
loaded: that needs ``trust_code=True`` (``--trust-pickle`` on the command line).
Folders of format 1 (``state_dict.pt``) still load, with ``torch.load(weights_only=True)``.

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
import re
import shutil
from collections import OrderedDict
from collections.abc import Container, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spectrim._files import atomic_directory, sha256_cached, sha256_file
from spectrim.graph.attention import BIAS_HEADS, find_attention
from spectrim.graph.channels import shared_tensors
from spectrim.graph.experts import find_experts
from spectrim.graph.modules import (
    PLAIN_MARK,
    module_kind,
    size_attribute_names,
    store_computed,
    swap_classes,
)
from spectrim.graph.stream import sync_stream_views
from spectrim.report import CompressionReport

__all__ = [
    "ALLOWED_CLASS_PREFIXES",
    "LEGACY_FORMAT",
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "ORIGINAL_FILE",
    "REPORT_FILE",
    "STATE_FILE",
    "WEIGHTS_FILE",
    "ManifestError",
    "apply_manifest",
    "build_arch",
    "build_manifest",
    "dump_manifest",
    "load_compressed",
    "read_manifest",
    "save_compressed",
    "verify_folder",
]

MANIFEST_FORMAT = "spectrim-manifest/2"
LEGACY_FORMAT = "spectrim-manifest/1"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state_dict.pt"  # format 1 (read only)
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.json"
ORIGINAL_FILE = "original.pt"

#: ``arch.class`` import paths built without ``trust_code`` (an ``nn.Module`` subclass there).
ALLOWED_CLASS_PREFIXES: tuple[str, ...] = (
    "spectrim.",
    "torchvision.models.",
    "timm.",
    "transformers.",
)
# keyword arguments that would make a builder read files or download weights
_FORBIDDEN_KWARGS = frozenset(
    {"pretrained", "weights", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay",
     "trust_remote_code", "cache_dir", "pretrained_model_name_or_path"}
)  # fmt: skip

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ManifestError(ValueError):
    """A manifest is malformed or does not match the model or the saved weights."""


def _size_attributes(module: nn.Module) -> dict[str, Any]:
    """The size attributes its registered kind records (:mod:`spectrim.graph.modules`)."""
    kind = module_kind(module)
    out: dict[str, Any] = {}
    for attr in kind.size_attributes if kind is not None else ():
        value = getattr(module, attr, None)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            out[attr] = value
        elif isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
            out[attr] = list(value)
    return out


def _tied_names(model: nn.Module, names: Container[str]) -> dict[str, str]:
    """Each of ``names`` (state-dict entries) that is the same tensor as an earlier one of
    them: alias -> that first name."""
    tied: dict[str, str] = {}
    for group in shared_tensors(model):
        kept = [n for n in group if n in names]
        tied.update({alias: kept[0] for alias in kept[1:]})
    return tied


def build_manifest(model: nn.Module, arch: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of ``model``: state-dict shapes, layer size attributes, ties and ``arch``.

    ``tied`` maps every state-dict entry that is the same tensor as another one (tied
    weights, e.g. an LM head and its embedding) to that first name; they are saved once
    and tied again on reload. ``files`` is filled in by :func:`save_compressed`.

    Example::

        >>> build_manifest(nn.Linear(3, 2))["modules"]
        {'': {'in_features': 3, 'out_features': 2}}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    state = model.state_dict(keep_vars=True)
    shapes = {
        name: [int(s) for s in t.shape] for name, t in state.items() if isinstance(t, torch.Tensor)
    }
    modules = {}
    swapped: dict[str, dict[str, Any]] = {}
    swaps = tuple(swap_classes().values())
    for name, module in model.named_modules():
        attrs = _size_attributes(module)
        if attrs:
            modules[name] = attrs
        if isinstance(module, swaps) and not any(name.startswith(f"{s}.") for s in swapped):
            kwargs = module.spectrim_kwargs()  # type: ignore[operator]
            swapped[name] = {"class": _qualname(type(module)), "kwargs": kwargs}
    from spectrim import __version__

    bias_heads = {
        name: [int(h) for h in kept]
        for name, module in model.named_modules()
        if isinstance(kept := getattr(module, BIAS_HEADS, None), list)
    }
    return {
        "format": MANIFEST_FORMAT,
        "shapes": shapes,
        "modules": modules,
        "swapped": swapped,
        "plain": [n for n, m in model.named_modules() if getattr(m, PLAIN_MARK, False)],
        "versions": _versions(state),
        "bias_heads": bias_heads,
        "tied": _tied_names(model, shapes),
        "arch": dict(arch) if arch is not None else None,
        "files": {},
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
    if fmt not in (MANIFEST_FORMAT, LEGACY_FORMAT):
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
    for mname, attrs in modules.items():
        for attr, value in attrs.items():
            if attr not in size_attribute_names():
                raise ManifestError(
                    f"{where}module {mname!r}: {attr!r} is not a size attribute spectrim "
                    f"records ({', '.join(sorted(size_attribute_names()))})"
                )
            ok = (isinstance(value, int) and not isinstance(value, bool)) or (
                isinstance(value, list) and all(isinstance(v, int) for v in value)
            )
            if not ok:
                raise ManifestError(
                    f"{where}module {mname!r}: {attr} must be an int or a list of ints, "
                    f"got {value!r}"
                )
    bias_heads = manifest.get("bias_heads", {})
    if not isinstance(bias_heads, dict) or not all(
        isinstance(v, list)
        and v
        and all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in v)
        and len(set(v)) == len(v)
        for v in bias_heads.values()
    ):
        raise ManifestError(
            f"{where}'bias_heads' must map attention layers to lists of distinct head indices"
        )
    versions = manifest.get("versions", {})
    if not isinstance(versions, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in versions.values()
    ):
        raise ManifestError(f"{where}'versions' must map module prefixes to ints")
    plain = manifest.get("plain", [])
    if not isinstance(plain, list) or not all(isinstance(n, str) for n in plain):
        raise ManifestError(f"{where}'plain' must be a list of module names, got {plain!r}")
    swapped = manifest.get("swapped", {})
    allowed = set(swap_classes())
    if not isinstance(swapped, dict) or not all(
        isinstance(v, dict) and v.get("class") in allowed and isinstance(v.get("kwargs"), dict)
        for v in swapped.values()
    ):
        raise ManifestError(
            f"{where}'swapped' must map module names to {{'class', 'kwargs'}} with a class "
            f"among {', '.join(sorted(allowed))}"
        )
    arch = manifest.get("arch")
    if arch is not None and not isinstance(arch, dict):
        raise ManifestError(f"{where}'arch' must be an object or null, got {arch!r}")
    tied = manifest.get("tied", {})
    if not isinstance(tied, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v in shapes for k, v in tied.items()
    ):
        raise ManifestError(f"{where}'tied' must map state-dict names to names under 'shapes'")
    packed = manifest.get("packed", {})
    if not isinstance(packed, dict) or not all(
        isinstance(k, str) and k in shapes and v == shapes[k] for k, v in packed.items()
    ):
        raise ManifestError(f"{where}'packed' must map names under 'shapes' to their shapes")
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise ManifestError(f"{where}'files' must be an object of file name -> checksum")
    for name, entry in files.items():
        if not isinstance(name, str) or not _PLAIN_NAME.match(name) or ".." in name:
            raise ManifestError(f"{where}file name {name!r} is not a plain name in the folder")
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
            and isinstance(entry.get("bytes"), int)
        ):
            raise ManifestError(f"{where}files[{name!r}] must be {{'sha256': hex, 'bytes': int}}")
    if fmt == MANIFEST_FORMAT:
        arch_file = (arch or {}).get("file")
        if arch_file is not None and not Path(str(arch_file)).is_absolute():
            if arch_file not in files:
                raise ManifestError(f"{where}arch file {arch_file!r} has no recorded checksum")
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


def verify_folder(directory: str | os.PathLike[str], manifest: Mapping[str, Any]) -> None:
    """Check every file listed under the manifest's ``files`` (size and sha256).

    Raises:
        FileNotFoundError: a listed file is missing.
        ManifestError: a file differs from its recorded checksum (names both hashes).
    """
    folder = Path(directory)
    if manifest.get("format") == MANIFEST_FORMAT and WEIGHTS_FILE not in manifest.get("files", {}):
        raise ManifestError(f"{folder / MANIFEST_FILE}: no checksum recorded for {WEIGHTS_FILE}")
    for name, entry in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (listed in {folder / MANIFEST_FILE})")
        size = path.stat().st_size
        digest = sha256_cached(path)
        if size != entry["bytes"] or digest != entry["sha256"]:
            raise ManifestError(
                f"{path} does not match {folder / MANIFEST_FILE}: sha256 {digest} "
                f"({size} bytes), expected {entry['sha256']} ({entry['bytes']} bytes). The "
                "file is corrupt, truncated or from another save; it was not loaded"
            )


def _owner(model: nn.Module, name: str, where: str) -> tuple[nn.Module, str]:
    module_name, _, leaf = name.rpartition(".")
    try:
        return model.get_submodule(module_name), leaf
    except AttributeError:
        raise ManifestError(
            f"{where}tensor {name!r}: the model ({type(model).__name__}) has no submodule "
            f"{module_name!r}; is the base model the architecture that was compressed?"
        ) from None


def _slot(model: nn.Module, name: str, where: str) -> tuple[str, dict[str, Any]]:
    """The leaf name and the ``_parameters`` / ``_buffers`` table holding tensor ``name``."""
    owner, leaf = _owner(model, name, where)
    if leaf in owner._parameters:
        return leaf, owner._parameters
    if leaf in owner._buffers:
        return leaf, owner._buffers
    raise ManifestError(
        f"{where}tensor {name!r} is neither a parameter nor a buffer of the model "
        f"({type(owner).__name__} at {name.rpartition('.')[0]!r})"
    )


def apply_manifest(
    model: nn.Module,
    manifest: Mapping[str, Any],
    *,
    source: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Reshape ``model`` (in place) to the manifest; return it.

    Every tensor listed under ``"shapes"`` whose shape differs is replaced by an uninitialised
    tensor of the recorded shape (same dtype, device, parameter-ness and ``requires_grad``;
    tied tensors stay tied, and the ties recorded under ``"tied"`` are made), and every
    attribute under ``"modules"`` is set. Load the weights afterwards with
    ``model.load_state_dict(state, strict=True)``.

    Raises:
        ManifestError: malformed manifest, or a name the model does not have. ``source``
            (e.g. the manifest path) prefixes the messages.
    """
    manifest = _validate(dict(manifest), source)
    where = _where(source)
    classes = swap_classes()
    for module_name, spec in manifest.get("swapped", {}).items():
        parent, _, leaf = module_name.rpartition(".")
        try:
            owner = model.get_submodule(parent) if parent else model
            getattr(owner, leaf)
        except AttributeError:
            raise ManifestError(
                f"{where}swapped module {module_name!r} is not in the model "
                f"({type(model).__name__})"
            ) from None
        try:
            swap = classes[spec["class"]](**spec["kwargs"])
        except TypeError as exc:
            raise ManifestError(f"{where}swapped module {module_name!r}: {exc}") from None
        setattr(owner, leaf, swap)
    for module_name in manifest.get("plain", []):  # its parametrizations went at compression
        try:
            store_computed(model.get_submodule(module_name) if module_name else model)
        except AttributeError:
            raise ManifestError(
                f"{where}module {module_name!r} (made plain) is not in the model "
                f"({type(model).__name__})"
            ) from None
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
    for module_name, kept in manifest.get("bias_heads", {}).items():
        try:  # the heads' rows of a shared position bias (hooked again by AttentionBlock.sync)
            setattr(model.get_submodule(module_name), BIAS_HEADS, list(kept))
        except AttributeError:
            raise ManifestError(
                f"{where}attention layer {module_name!r} is not in the model "
                f"({type(model).__name__})"
            ) from None

    tied = manifest.get("tied", {})
    if manifest["format"] == MANIFEST_FORMAT:  # format 1 recorded no ties at all
        _untie(model, tied)
    replaced: dict[int, torch.Tensor] = {}
    for name, shape in manifest["shapes"].items():
        leaf, table = _slot(model, name, where)
        old = table[leaf]
        if old is None:  # a parameter the surgery added (a Linear's bias)
            weight: Any = table.get("weight")
            if isinstance(weight, torch.Tensor):
                data = torch.empty(shape, dtype=weight.dtype, device=weight.device)
                table[leaf] = nn.Parameter(data, requires_grad=weight.requires_grad)
            continue
        if list(old.shape) == shape:
            continue
        new = replaced.get(id(old))
        if new is None:
            data = torch.empty(shape, dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                new = nn.Parameter(data, requires_grad=old.requires_grad)
            else:
                new = data
            replaced[id(old)] = new
        table[leaf] = new
    _tie(model, tied, where)
    return model


def _untie(model: nn.Module, tied: Mapping[str, str]) -> None:
    """Give a tensor of its own to every name the model shares with another but the
    manifest does not tie (the compression untied them, e.g. an LM head folded with a
    norm's scale)."""
    for group in shared_tensors(model):
        first = tied.get(group[0], group[0])
        for name in group[1:]:
            if tied.get(name, name) != first:
                owner = model.get_submodule(name.rpartition(".")[0])
                leaf = name.rpartition(".")[2]
                table: Any = owner._parameters if leaf in owner._parameters else owner._buffers
                old = table[leaf]
                assert old is not None
                clone = old.detach().clone()
                table[leaf] = (
                    nn.Parameter(clone, old.requires_grad)
                    if isinstance(old, nn.Parameter)
                    else clone
                )


def _tie(model: nn.Module, tied: Mapping[str, str], where: str) -> None:
    """Make every alias in ``tied`` the very tensor of its canonical name."""
    for alias, canonical in tied.items():
        c_leaf, c_table = _slot(model, canonical, where)
        a_leaf, a_table = _slot(model, alias, where)
        a_table[a_leaf] = c_table[c_leaf]


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


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _kwargs(arch: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    kwargs = arch.get(key) or {}
    if not isinstance(kwargs, dict):
        raise ManifestError(f"{where}arch {key!r} must be an object, got {kwargs!r}")
    bad = sorted(_FORBIDDEN_KWARGS & set(kwargs))
    if bad:
        raise ManifestError(
            f"{where}arch {key!r} may not set {', '.join(bad)}: the architecture is built "
            "without pretrained weights, and its weights come from the folder"
        )
    return dict(kwargs)


def _build_class(
    arch: Mapping[str, Any], where: str, trust_code: bool, classes: Sequence[type]
) -> nn.Module:
    path = str(arch["class"])
    cls: Any = {_qualname(c): c for c in classes}.get(path)
    if cls is None:
        if not trust_code and not path.startswith(ALLOWED_CLASS_PREFIXES):
            raise ManifestError(
                f"{where}arch class {path!r} is not on the allow-list ("
                + ", ".join(p.rstrip(".") for p in ALLOWED_CLASS_PREFIXES)
                + "), so it was not imported. If it is your model class, pass it: "
                "load_compressed(folder, classes=[YourClass]); trust_code=True imports any "
                "class (that runs code)"
            )
        try:
            cls = _import_object(path)
        except ImportError as exc:
            raise ManifestError(f"{where}arch class: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ManifestError(f"{where}arch class {path!r} is not an nn.Module class")
    kwargs = _kwargs(arch, "kwargs", where)
    try:
        model = cls(**kwargs)
    except TypeError as exc:
        raise ManifestError(f"{where}arch class {path!r}: {exc}") from None
    return model


def _build_transformers(arch: Mapping[str, Any], where: str) -> nn.Module:
    import transformers

    auto = str(arch["transformers"])
    cls = getattr(transformers, auto, None) if auto.startswith("Auto") else None
    if cls is None or not hasattr(cls, "from_config"):
        raise ManifestError(
            f"{where}arch transformers {auto!r} is not a transformers Auto class "
            "(e.g. 'AutoModel', 'AutoModelForCausalLM')"
        )
    config = _kwargs(arch, "config", where)
    if config.get("auto_map"):
        raise ManifestError(f"{where}arch config uses remote code (auto_map); not supported")
    model_type = config.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ManifestError(f"{where}arch config has no 'model_type'")
    cfg = transformers.AutoConfig.for_model(model_type, **config)
    return cls.from_config(cfg)  # type: ignore[no-any-return]


def build_arch(
    arch: Mapping[str, Any] | None,
    *,
    source: str | None = None,
    folder: str | os.PathLike[str] | None = None,
    trust_code: bool = False,
    classes: Sequence[type] = (),
) -> nn.Module:
    """Build the original (uncompressed) architecture described by a manifest's ``arch``.

    See the module docstring for the forms; ``folder`` resolves a relative ``file``.
    Without ``trust_code`` nothing is unpickled and only allow-listed or given ``classes``
    are imported.
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
    if "torchvision" in arch:
        import torchvision

        kwargs = _kwargs(arch, "kwargs", where)
        return torchvision.models.get_model(str(arch["torchvision"]), weights=None, **kwargs)
    if "timm" in arch:
        import timm

        kwargs = _kwargs(arch, "kwargs", where)
        return timm.create_model(str(arch["timm"]), pretrained=False, **kwargs)  # type: ignore[no-any-return]
    if "transformers" in arch:
        return _build_transformers(arch, where)
    if "file" in arch:
        from spectrim.io.model_file import load_model_file

        path = Path(str(arch["file"]))
        if folder is not None and not path.is_absolute():
            if not _PLAIN_NAME.match(str(path)) or ".." in str(path):
                raise ManifestError(f"{where}arch file {str(path)!r} is not a file of the folder")
            path = Path(folder) / path
        return load_model_file(path, trust_pickle=trust_code)
    if "class" in arch:
        return _build_class(arch, where, trust_code, classes)
    raise ManifestError(
        f"{where}arch {dict(arch)!r} names no 'zoo', 'torchvision', 'timm', 'transformers', "
        "'file' or 'class'; pass base_model="
    )


def dump_manifest(manifest: Mapping[str, Any]) -> str:
    """JSON text of a manifest, one tensor or module per line (diff-friendly, compact)."""

    def compact(value: Any) -> str:
        return json.dumps(value, separators=(", ", ": "))

    lines = ["{"]
    items = list(manifest.items())
    for i, (key, value) in enumerate(items):
        tail = "," if i < len(items) - 1 else ""
        if isinstance(value, dict) and value and key in ("shapes", "modules", "tied", "files"):
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


#: Suffixes of the two entries a packed (sparse) tensor is stored as.
MASK_SUFFIX, VALUES_SUFFIX = "::mask", "::values"
#: Tensors with at least this share of zeros (and at least 64 entries) are packed.
PACK_MIN_ZEROS = 0.5


def _pack(tensors: dict[str, torch.Tensor], min_zeros: float) -> dict[str, Any]:
    """Replace every floating tensor with at least ``min_zeros`` zeros by a bitmask of its
    non-zeros (``uint8``, 8 entries per byte) and the non-zero values in row-major order;
    returns the manifest's ``packed`` map (name -> shape)."""
    packed: dict[str, Any] = {}
    for name in list(tensors):
        t = tensors[name]
        if not t.is_floating_point() or t.numel() < 64:
            continue
        nz = t != 0
        if 1.0 - float(nz.sum()) / t.numel() < min_zeros:
            continue
        flat = nz.reshape(-1).numpy()
        tensors[name + MASK_SUFFIX] = torch.from_numpy(np.packbits(flat))
        tensors[name + VALUES_SUFFIX] = t.reshape(-1)[nz.reshape(-1)].contiguous()
        packed[name] = [int(s) for s in t.shape]
        del tensors[name]
    return packed


def _unpack(state: dict[str, Any], packed: Mapping[str, Any], path: Path) -> None:
    for name, shape in packed.items():
        mask = state.pop(name + MASK_SUFFIX, None)
        values = state.pop(name + VALUES_SUFFIX, None)
        if not isinstance(mask, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise ManifestError(f"{path}: packed tensor {name!r} lacks its mask or values")
        numel = int(np.prod(shape)) if shape else 1
        if mask.dtype != torch.uint8 or mask.numel() != (numel + 7) // 8:
            raise ManifestError(f"{path}: the mask of packed tensor {name!r} does not fit {shape}")
        bits = torch.from_numpy(np.unpackbits(mask.cpu().numpy(), count=numel).astype(bool))
        if int(bits.sum()) != values.numel():
            raise ManifestError(
                f"{path}: packed tensor {name!r} has {values.numel()} values for "
                f"{int(bits.sum())} non-zeros in its mask"
            )
        full = torch.zeros(numel, dtype=values.dtype, device=values.device)
        full[bits.to(values.device)] = values
        state[name] = full.reshape(shape)


def _weights(model: nn.Module, tied: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The state dict as safetensors takes it: one entry per distinct tensor, contiguous,
    no two entries sharing memory."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, t in model.state_dict().items():
        if name in tied:
            continue
        if not isinstance(t, torch.Tensor):
            raise ManifestError(
                f"state-dict entry {name!r} is a {type(t).__name__}, not a tensor; "
                "safetensors stores tensors only"
            )
        t = t.detach().cpu()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in storages or not t.is_contiguous():
                t = t.clone(memory_format=torch.contiguous_format)
            storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def save_compressed(
    model: nn.Module,
    directory: str | os.PathLike[str],
    report: CompressionReport | Mapping[str, Any] | None = None,
    arch: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
    original_file: str | os.PathLike[str] | None = None,
    pack: bool = True,
) -> Path:
    """Write ``model.safetensors``, ``manifest.json`` (and ``report.json``) to ``directory``.

    The folder is written atomically: everything goes into a temporary sibling that
    replaces ``directory`` only once it is complete, so an interrupted save leaves the old
    folder as it was.

    Args:
        model: the compressed model.
        directory: output folder; must not exist or be empty, unless ``overwrite``.
        report: the :class:`~spectrim.report.CompressionReport` (or its dict), saved as JSON.
        arch: how to rebuild the original architecture, e.g. ``{"zoo": "resnet56-cifar10"}``
            (see :func:`build_arch`); without it (and without ``original_file``)
            :func:`load_compressed` needs ``base_model``.
        overwrite: replace an existing non-empty ``directory``.
        original_file: the model file the model was compressed from; it is copied into the
            folder (``original.pt``) and, when ``arch`` is not given, rebuilds the
            architecture on reload, so the folder loads without the original file.
        pack: store every floating tensor with at least half its entries zero (a
            sparsified weight) as a bitmask plus its non-zero values (``name::mask``,
            ``name::values``; listed under ``packed`` in the manifest), so a sparse
            model's file is smaller than the dense one; reloading restores it exactly.

    Returns:
        The directory.

    Raises:
        OutputExistsError: ``directory`` is not empty and ``overwrite`` is false.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    manifest = build_manifest(model, arch)
    if original_file is not None and arch is None:
        manifest["arch"] = {"file": ORIGINAL_FILE}
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        tensors = _weights(model, manifest["tied"])
        if pack:
            manifest["packed"] = _pack(tensors, PACK_MIN_ZEROS)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        names = [WEIGHTS_FILE]
        if original_file is not None:
            shutil.copyfile(original_file, tmp / ORIGINAL_FILE)
            names.append(ORIGINAL_FILE)
        if report is not None:
            data = report.to_dict() if isinstance(report, CompressionReport) else dict(report)
            (tmp / REPORT_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
            names.append(REPORT_FILE)
        manifest["files"] = {
            n: {"sha256": sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size} for n in names
        }
        (tmp / MANIFEST_FILE).write_text(dump_manifest(manifest), encoding="utf-8")
    return Path(directory)


def _versions(state: Mapping[str, Any]) -> dict[str, int]:
    """The modules' state-dict versions (``_version``, kept in the state dict's
    ``_metadata``), by module prefix: what ``_load_from_state_dict`` reads to convert
    older layouts (torchvision's MNASNet refuses a state without one)."""
    meta = getattr(state, "_metadata", None) or {}
    return {
        str(k): int(v["version"])
        for k, v in meta.items()
        if isinstance(v, Mapping) and isinstance(v.get("version"), int)
    }


def _with_versions(
    state: Mapping[str, Any], manifest: Mapping[str, Any], model: nn.Module
) -> OrderedDict[str, Any]:
    """``state`` with the versions its modules were saved at (the manifest's, or for a
    folder saved before they were recorded, the fresh model's own: the same code)."""
    versions = manifest.get("versions")
    if versions is None:
        versions = _versions(model.state_dict())
    out: OrderedDict[str, Any] = OrderedDict(state)
    out._metadata = {k: {"version": v} for k, v in versions.items()}  # type: ignore[attr-defined]
    return out


def _read_weights(folder: Path, manifest: Mapping[str, Any], map_location: Any) -> dict[str, Any]:
    if manifest["format"] == LEGACY_FORMAT:
        path = folder / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:
            raise ManifestError(f"{path}: cannot read the weights ({exc})") from None
        if not isinstance(state, Mapping):
            raise ManifestError(f"{path}: expected a state dict, got {type(state).__name__}")
        return dict(state)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_FILE
    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ManifestError(f"{path}: cannot read the weights ({exc})") from None
    _unpack(state, manifest.get("packed", {}), path)
    for alias, canonical in manifest.get("tied", {}).items():
        if canonical in state:
            state[alias] = state[canonical]
    return state


def load_compressed(
    directory: str | os.PathLike[str],
    base_model: nn.Module | None = None,
    *,
    map_location: str | torch.device = "cpu",
    trust_code: bool = False,
    classes: Sequence[type] = (),
) -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed`, in eval mode.

    Every file the manifest lists is checked against its sha256 first.

    Args:
        directory: the folder written by :func:`save_compressed`.
        base_model: the original architecture (e.g. ``get_model(name, pretrained=False)``);
            it is reshaped and loaded **in place**. Default: built from the manifest's
            ``arch`` (:func:`build_arch`).
        map_location: where to load the weights.
        trust_code: allow what executes code: unpickling a pickled ``original.pt`` (or a
            format-1 ``arch.file``) and importing an ``arch.class`` off the allow-list.
            Only for folders you trust.
        classes: model classes the manifest's ``arch.class`` may name (matched by their
            import path), without ``trust_code``.

    Raises:
        FileNotFoundError: a file is missing.
        ManifestError: the manifest is malformed, a file fails its checksum, or the
            manifest does not fit the model or the weights.
    """
    folder = Path(directory)
    for c in classes:
        if not (isinstance(c, type) and issubclass(c, nn.Module)):
            raise TypeError(f"classes must hold nn.Module classes, got {c!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory (expected a save_compressed folder)")
    manifest = read_manifest(folder)
    manifest_path = folder / MANIFEST_FILE
    verify_folder(folder, manifest)
    state_path = folder / (WEIGHTS_FILE if manifest["format"] == MANIFEST_FORMAT else STATE_FILE)
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path} not found")
    model = (
        base_model
        if base_model is not None
        else build_arch(
            manifest.get("arch"),
            source=str(manifest_path),
            folder=folder,
            trust_code=trust_code,
            classes=classes,
        )
    )
    apply_manifest(model, manifest, source=manifest_path)
    state = _with_versions(_read_weights(folder, manifest, map_location), manifest, model)
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
    if manifest["format"] == LEGACY_FORMAT:
        _check_legacy_ties(model, state, state_path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ManifestError(f"{state_path}: {exc}") from None
    for block in find_attention(model):  # head counts follow the reloaded weights
        block.sync(model)
    for experts in find_experts(model):  # and so do the experts' widths
        experts.sync(model)
    sync_stream_views(model)  # and a MoE router's stream width
    return model.eval()


def _check_legacy_ties(model: nn.Module, state: Mapping[str, Any], path: Path) -> None:
    """A format-1 state dict holds each tied tensor twice: they must agree, or loading
    into a model that ties them would keep only one of two different values."""
    for alias, canonical in _tied_names(model, state).items():
        a, c = state.get(alias), state.get(canonical)
        if isinstance(a, torch.Tensor) and isinstance(c, torch.Tensor) and not torch.equal(a, c):
            raise ManifestError(
                f"{path}: {alias!r} and {canonical!r} are one tied tensor in the model but "
                "differ in the file (the compression untied them); this folder cannot be "
                "loaded faithfully into this architecture"
            )
