"""Saving, reloading and importing models.

* :func:`save_compressed` / :func:`load_compressed`: a compressed model as ``model.safetensors``
  plus a shape manifest (``manifest.json``, with the sha256 of every file) that reshapes the
  original architecture on reload; written atomically, verified on load, no code executed
  unless ``trust_code=True``;
* :func:`apply_manifest`: reshape a model to a manifest (then ``load_state_dict``);
* :func:`load_model_file`: a user's model file, TorchScript or (``trust_pickle=True``) a
  pickled ``nn.Module``.

Example::

    >>> from spectrim.io import load_compressed, save_compressed
    >>> # small, report = spectrim.compress(model, calib, target="macs=0.5")
    >>> # save_compressed(small, "out/", report, arch={"zoo": "resnet56-cifar10"})
    >>> # model = load_compressed("out/")
"""

from spectrim.io.manifest import (
    ALLOWED_CLASS_PREFIXES,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    ORIGINAL_FILE,
    REPORT_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    ManifestError,
    apply_manifest,
    build_arch,
    build_manifest,
    dump_manifest,
    load_compressed,
    read_manifest,
    save_compressed,
    verify_folder,
)
from spectrim.io.model_file import ModelFileError, is_torchscript_file, load_model_file
from spectrim.io.torchscript import TorchScriptConversionError, check_equivalent, script_to_module

__all__ = [
    "ALLOWED_CLASS_PREFIXES",
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "ORIGINAL_FILE",
    "REPORT_FILE",
    "STATE_FILE",
    "WEIGHTS_FILE",
    "ManifestError",
    "ModelFileError",
    "TorchScriptConversionError",
    "apply_manifest",
    "build_arch",
    "build_manifest",
    "dump_manifest",
    "check_equivalent",
    "is_torchscript_file",
    "load_compressed",
    "load_model_file",
    "read_manifest",
    "save_compressed",
    "script_to_module",
    "verify_folder",
]
