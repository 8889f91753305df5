"""Shared pieces of the command-line interface: resolving models and data, output, progress."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from collections.abc import Iterable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from spectrim._files import OutputExistsError, atomic_write_text, check_output_dir

__all__ = [
    "CLIError",
    "DataSplits",
    "ResolvedModel",
    "add_data_options",
    "check_json_dest",
    "check_model_spec",
    "check_out_dir",
    "eval_batches",
    "fraction",
    "human_stream",
    "load_data",
    "nonneg_float",
    "nonneg_int",
    "original_from_arch",
    "positive_float",
    "positive_floats",
    "positive_int",
    "progress_wrapper",
    "resolve_model",
    "subset",
    "write_json",
]


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


# ------------------------------------------------------------------------------ argument types


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a non-negative integer")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be finite")
    return value


def nonneg_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a non-negative number")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def fraction(text: str) -> float:
    """A number in ``(0, 1]``."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1]")
    return value


def positive_floats(text: str) -> tuple[float, ...]:
    """A comma-separated list of positive numbers."""
    values = _floats(text)
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be a positive number")
    return values


def method_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` for a method option; VALUE becomes a bool, int or float when it reads as one.

    >>> method_option("theta=0.25"), method_option("tau=leverage")
    (('theta', 0.25), ('tau', 'leverage'))
    """
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key.isidentifier() or not raw:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. theta=0.25)")
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return key, lowered == "true"
    for kind in (int, float):
        try:
            return key, kind(raw)
        except ValueError:
            pass
    return key, raw


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        h, w = (int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HxW (e.g. 32x32) or one size") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be positive")
    return h, w


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """Options for user data (image folders, tensor and table files, text files)."""
    group = parser.add_argument_group(
        "options for your own data (a folder, .pt/.npz/.csv tensors or features, text files)"
    )
    group.add_argument(
        "--file-order",
        action="store_true",
        help="cut one file or folder into calibration and evaluation examples in the "
        "order found (default: text and data without class labels in a random order "
        "drawn from --seed, so the first --calib are a uniform sample however the file "
        "is sorted; labelled data come every class in turn either way)",
    )
    group.add_argument(
        "--mean", type=_floats, metavar="M[,M,M]", help="per-channel mean to subtract"
    )
    group.add_argument(
        "--std", type=_floats, metavar="S[,S,S]", help="per-channel std to divide by"
    )
    group.add_argument("--grayscale", action="store_true", help="read images as one channel")
    group.add_argument(
        "--image-size", type=_size, metavar="HxW", help="resize images (folders only)"
    )


# ------------------------------------------------------------------------------------- output


def human_stream(json_dest: str | None) -> TextIO:
    """Where human-readable text goes: stderr when the JSON goes to stdout."""
    return sys.stderr if json_dest == "-" else sys.stdout


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def write_json(obj: Any, dest: str | None) -> None:
    """Write ``obj`` as JSON to the file ``dest`` (``-``: stdout; ``None``: nowhere)."""
    if dest is None:
        return
    text = json.dumps(_jsonable(obj), indent=2) + "\n"
    if dest == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        atomic_write_text(dest, text)
    except OSError as exc:
        raise CLIError(f"--json {dest}: cannot write ({exc.strerror or exc})") from None


def check_json_dest(dest: str | None) -> None:
    """Fail before any long work when ``--json FILE`` cannot be written."""
    if dest is None or dest == "-":
        return
    path = Path(dest)
    if path.is_dir():
        raise CLIError(f"--json {dest}: is a directory")
    try:
        check_output_dir(path.parent, overwrite=True, what=f"--json {dest}: folder")
    except OSError as exc:
        raise CLIError(str(exc.strerror or exc)) from None


def check_out_dir(dest: str, overwrite: bool, option: str = "--out") -> Path:
    """Fail before any long work when the output folder cannot be written or is taken."""
    try:
        return check_output_dir(dest, overwrite=overwrite, what=option)
    except OutputExistsError:
        raise CLIError(
            f"{option} {dest!r} exists and is not empty; pass --overwrite to replace it "
            "(everything in it is replaced) or choose a new folder"
        ) from None
    except NotADirectoryError:
        raise CLIError(f"{option} {dest!r} exists and is not a directory") from None
    except OSError as exc:
        raise CLIError(str(exc.strerror or exc)) from None


def progress_wrapper(desc: str, quiet: bool) -> Any:
    """A function wrapping an iterable in a tqdm bar on stderr.

    No bar when ``quiet`` or when stderr is not a terminal (logs stay clean).
    """

    def wrap(iterable: Iterable[Any]) -> Iterable[Any]:
        if quiet:
            return iterable
        from tqdm.auto import tqdm

        total = len(iterable) if isinstance(iterable, Sized) else None
        return tqdm(
            iterable,
            total=total,
            desc=desc,
            unit="batch",
            file=sys.stderr,
            leave=False,
            disable=None,  # off when stderr is not a TTY
        )

    return wrap


# --------------------------------------------------------------------------------------- data


@dataclass
class DataSplits:
    """Calibration inputs and labelled evaluation data resolved from ``--data``."""

    name: str
    calib: TensorDataset | None
    eval: TensorDataset
    note: str = ""
    order: str = "the dataset's splits"
    shared: bool = False
    """whether calibration and evaluation were cut from one set, the evaluation the
    examples after the calibration ones (``eval`` on the same data then skips them too);
    false where nothing was left after calibration and the evaluation took it instead"""


def subset(ds: TensorDataset, start: int, stop: int | None) -> TensorDataset:
    """Examples ``start:stop`` of a tensor dataset."""
    return TensorDataset(*(t[start:stop] for t in ds.tensors))


def _split_dirs(p: Path) -> tuple[Path | None, Path | None]:
    def first(names: tuple[str, ...]) -> Path | None:
        for name in names:
            if (p / name).is_dir():
                return p / name
        return None

    return first(("calib", "train")), first(("eval", "test", "val", "validation"))


def load_data(
    spec: str,
    calib: int | None,
    eval_limit: int | None,
    args: argparse.Namespace,
) -> DataSplits:
    """Resolve ``--data``: a built-in dataset name, or a folder/.pt/.npz of your own images.

    Built-in datasets use their ``calib`` (train) and ``eval`` (test) splits. A folder with
    ``train``/``calib`` and ``test``/``eval``/``val`` subfolders uses those; any other folder or
    file is one set: the first ``calib`` examples calibrate and the rest evaluate.  Labelled
    data comes one of every class at a time, so both parts hold every class; data without
    class labels (a flat folder, regression targets) in a random order drawn from
    ``--seed``, so both are uniform samples however the file is sorted, unless
    ``--file-order``.  ``calib=None`` means no calibration data is needed (evaluation only).
    """
    from spectrim.zoo import list_datasets, load_dataset, load_image_folder

    calib_set: TensorDataset | None
    eval_set: TensorDataset
    if spec in list_datasets():
        calib_set = load_dataset(spec, "calib", limit=calib) if calib is not None else None
        return DataSplits(spec, calib_set, load_dataset(spec, "eval", limit=eval_limit))

    p = Path(spec).expanduser()
    if not p.exists():
        raise CLIError(
            f"--data {spec!r}: no such file or directory, and not a built-in dataset "
            f"(available: {', '.join(list_datasets())})"
        )
    mean, std = getattr(args, "mean", None), getattr(args, "std", None)
    if (mean is None) != (std is None):
        raise CLIError("--mean and --std must be given together")
    normalize = (mean, std) if mean is not None and std is not None else None
    options: dict[str, Any] = {"normalize": normalize, "seed": data_seed(args)}
    if p.is_dir():
        options["grayscale"] = bool(getattr(args, "grayscale", False))
        options["size"] = getattr(args, "image_size", None)

    calib_dir, eval_dir = _split_dirs(p) if p.is_dir() else (None, None)
    if eval_dir is not None and (calib_dir is not None or calib is None):
        eval_set = load_image_folder(eval_dir, limit=eval_limit, **options)
        calib_set = None
        if calib is not None and calib_dir is not None:
            calib_set = load_image_folder(calib_dir, limit=calib, **options)
        return DataSplits(str(p), calib_set, eval_set, "", data_order(eval_set, args))

    # one set (an eval split alone calibrates too): the first ``calib`` examples
    # calibrate and the evaluation takes the ones after them
    whole: TensorDataset = load_image_folder(eval_dir or p, **options)
    n = len(whole)
    order = data_order(whole, args)
    if calib is None:
        return DataSplits(str(p), None, subset(whole, 0, eval_limit), "", order)
    calib_set = subset(whole, 0, min(calib, n))
    stop = None if eval_limit is None else calib + eval_limit
    eval_set = subset(whole, calib, stop)
    note = "" if eval_dir is None else "calibrating on the eval split's first examples"
    shared = len(eval_set) > 0
    if not shared:
        eval_set = subset(whole, 0, eval_limit)
        note = "no examples left after calibration: evaluating on the calibration data"
    return DataSplits(str(p), calib_set, eval_set, note, order, shared=shared)


def data_seed(args: argparse.Namespace) -> int | None:
    """The seed that orders a user's examples without class labels (``--seed``, default
    0), or ``None`` with ``--file-order``."""
    if getattr(args, "file_order", False):
        return None
    return int(getattr(args, "seed", 0) or 0)


def data_order(ds: TensorDataset, args: argparse.Namespace) -> str:
    """How the examples of a user's set were ordered before it was cut, in words."""
    labels = ds.tensors[1] if len(ds.tensors) > 1 else None
    if labels is not None and labels.numel() and bool((labels >= 0).all()):
        return "every class in turn"
    seed = data_seed(args)
    return "file order" if seed is None else f"random, seed {seed}"


def draw_texts(texts: list[str], args: argparse.Namespace) -> tuple[list[str], str]:
    """The texts in a random order drawn from ``--seed`` (file order with
    ``--file-order``), so the first ``--calib`` are a uniform sample however the file is
    sorted (STS-B's training file opens with 2000 image captions), and how."""
    seed = data_seed(args)
    if seed is None:
        return list(texts), "file order"
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
    return [texts[i] for i in order.tolist()], f"random, seed {seed}"


def eval_batches(ds: TensorDataset, batch_size: int, quiet: bool, desc: str) -> Iterable[Any]:
    """Batches of a dataset for :func:`spectrim.evaluation.evaluate`, with a progress bar.

    Unlabelled data (every label ``-1``) is passed as inputs only: accuracy is then ``None``
    while agreement and fidelity are still measured.
    """
    tensors = ds.tensors
    if len(tensors) > 1 and tensors[1].numel() and bool((tensors[1] < 0).all()):
        ds = TensorDataset(tensors[0])
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
    return progress_wrapper(desc, quiet)(loader)


# ------------------------------------------------------------------------------------- models


@dataclass
class ResolvedModel:
    """A model from ``--model`` and how to rebuild its architecture."""

    model: nn.Module
    kind: str  # "zoo", "file", "compressed" or "hf"
    arch: dict[str, Any] | None
    label: str
    file: Path | None = None  # the model file (kind "file"), copied into a saved folder
    folder: Path | None = None  # the compressed folder (kind "compressed")
    tokenizer: Any = None  # a Hugging Face model's tokenizer (kind "hf")


def check_model_spec(spec: str, option: str = "--model") -> str:
    """Fail fast (before loading data) on a model that is neither a path nor a zoo name."""
    from spectrim.zoo import list_models

    p = Path(spec).expanduser()
    if p.is_dir():
        from spectrim.io import MANIFEST_FILE

        if (p / MANIFEST_FILE).is_file():
            return "compressed"
        if (p / "config.json").is_file():
            return "hf"
        raise CLIError(
            f"{option} {spec!r}: directory has no {MANIFEST_FILE} and no config.json "
            "(expected a folder written by 'spectrim compress --out' or a Hugging Face "
            "model folder)"
        )
    if p.is_file():
        return "file"
    if spec in list_models():
        return "zoo"
    raise CLIError(
        f"{option} {spec!r}: no such file or directory, and not a zoo model "
        f"(available: {', '.join(list_models())})"
    )


def resolve_model(
    spec: str,
    example_inputs: Any = None,
    option: str = "--model",
    *,
    trust_pickle: bool = False,
    offload_folder: str | None = None,
) -> ResolvedModel:
    """Load ``spec``: a compressed folder, a model file, or a zoo name (pretrained).

    Pickled model files (and compressed folders whose original is one) load only with
    ``trust_pickle`` (``--trust-pickle``): unpickling runs code from the file.  A Hugging
    Face folder with ``offload_folder`` keeps its weights in files there (accelerate),
    read layer by layer, instead of in memory.
    """
    from spectrim.io import load_compressed, load_model_file, read_manifest
    from spectrim.zoo import get_model

    kind = check_model_spec(spec, option)
    p = Path(spec).expanduser()
    if offload_folder is not None and kind != "hf":
        raise CLIError(
            f"--offload-folder keeps a Hugging Face model's weights on disk; {option} "
            f"{spec!r} is not a Hugging Face model folder"
        )
    if kind == "compressed":
        manifest = read_manifest(p)
        model = load_compressed(p, trust_code=trust_pickle)
        return ResolvedModel(model, kind, manifest.get("arch"), str(p), folder=p)
    if kind == "file":
        model = load_model_file(p, example_inputs, trust_pickle=trust_pickle)
        return ResolvedModel(model.eval(), kind, None, str(p), file=p.resolve())
    if kind == "hf":
        return _hf_model(p, option, offload_folder)
    return ResolvedModel(get_model(spec, pretrained=True).eval(), kind, {"zoo": spec}, spec)


def _hf_model(p: Path, option: str, offload_folder: str | None = None) -> ResolvedModel:
    """A Hugging Face model folder (a sentence-transformers folder holds one at its root):
    the model through its Auto class, never with remote code, and its tokenizer; with
    ``offload_folder``, every weight offloaded to files there (needs accelerate)."""
    try:
        import transformers
    except ImportError:
        raise CLIError(
            f"{option} {p}: a Hugging Face folder needs 'pip install transformers'"
        ) from None
    try:
        config = transformers.AutoConfig.from_pretrained(p)
    except (OSError, ValueError) as exc:
        raise CLIError(f"{option} {p}: not a Hugging Face model folder ({exc})") from None
    if getattr(config, "auto_map", None):
        raise CLIError(f"{option} {p}: the model needs its own code (auto_map); not supported")
    if getattr(config, "is_encoder_decoder", False):
        names = ", ".join(config.architectures or [type(config).__name__])
        raise CLIError(
            f"{option} {p}: {names} is an encoder-decoder; the command line calibrates encoders "
            "and causal LMs on text, which gives no decoder inputs: compress it from Python, "
            "spectrim.compress(AutoModelForSeq2SeqLM.from_pretrained(...), batches, ...), "
            "with batches that hold decoder_input_ids (docs/architectures.md, "
            "'Encoder-decoders')"
        )
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    auto = "AutoModelForCausalLM" if causal else "AutoModel"
    where: dict[str, Any] = {}
    if offload_folder is not None:
        if importlib.util.find_spec("accelerate") is None:
            raise CLIError("--offload-folder needs 'pip install accelerate'")
        where = {"device_map": {"": "disk"}, "offload_folder": offload_folder}
    try:
        model = getattr(transformers, auto).from_pretrained(p, **where).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError) as exc:
        raise CLIError(f"{option} {p}: {exc}") from None
    arch = {"transformers": auto, "config": config.to_dict(), "tokenizer": str(p.resolve())}
    return ResolvedModel(model, "hf", arch, str(p), tokenizer=tokenizer)


def original_from_arch(
    arch: dict[str, Any] | None, folder: Path | None = None, *, trust_pickle: bool = False
) -> tuple[nn.Module, str] | None:
    """The trained original model a compressed folder was made from (``None`` if unknown):
    the zoo model, or the copy of the original model file kept in the folder."""
    from spectrim.io import load_model_file
    from spectrim.zoo import get_model

    if not arch:
        return None
    if "zoo" in arch:
        return get_model(str(arch["zoo"]), pretrained=True).eval(), str(arch["zoo"])
    if "file" in arch:
        path = Path(str(arch["file"]))
        if folder is not None and not path.is_absolute():
            path = folder / path  # verified with the folder by load_compressed
        if not path.is_file():
            raise CLIError(
                f"the original model file {path} recorded in the manifest is gone; "
                "pass --reference FILE or --no-reference"
            )
        return load_model_file(path, trust_pickle=trust_pickle).eval(), str(path)
    return None
