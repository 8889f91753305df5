"""Saving, reloading and importing models.

* :func:`save_compressed` / :func:`load_compressed`: a compressed model as ``state_dict.pt`` plus
  a shape manifest (``manifest.json``) that reshapes the original architecture on reload;
* :func:`apply_manifest`: reshape a model to a manifest (then ``load_state_dict``);
* :func:`load_model_file`: a user's model file, TorchScript or a pickled ``nn.Module``.

Example::

    >>> from spectrim.io import load_compressed, save_compressed
    >>> # small, report = spectrim.compress(model, calib, target="macs=0.5")
    >>> # save_compressed(small, "out/", report, arch={"zoo": "resnet56-cifar10"})
    >>> # model = load_compressed("out/")
"""

from spectrim.io.manifest import (
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    REPORT_FILE,
    STATE_FILE,
    ManifestError,
    apply_manifest,
    build_arch,
    build_manifest,
    dump_manifest,
    load_compressed,
    read_manifest,
    save_compressed,
)
from spectrim.io.model_file import ModelFileError, is_torchscript_file, load_model_file
from spectrim.io.torchscript import TorchScriptConversionError, check_equivalent, script_to_module

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "REPORT_FILE",
    "STATE_FILE",
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
]
