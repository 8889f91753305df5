"""ONNX export of a (compressed) model, checked with onnxruntime against PyTorch.

:func:`export_onnx` runs ``torch.onnx.export`` (the ``torch.export``-based exporter) on
example inputs with a dynamic batch axis (and a dynamic token axis for tokenised text),
writes the file atomically (a temporary sibling renamed into place), then runs it with
onnxruntime on the check inputs and reports the largest absolute difference from the
PyTorch model's outputs: the number that says the exported file computes what the model
computes.  Needs ``pip install onnx onnxruntime onnxscript`` (the ``onnx`` extra).

Example::

    >>> import tempfile, pathlib, torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "net.onnx"
    >>> result = export_onnx(net, torch.randn(3, 4), path, check_inputs=torch.randn(5, 4))
    >>> result["max_abs_diff"] < 1e-5, result["outputs"]
    (True, 1)
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["export_onnx"]


def _require() -> Any:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError as exc:
        raise ImportError(
            f"ONNX export needs onnx, onnxruntime and onnxscript ({exc.name} is missing): "
            "pip install 'spectrim[onnx]'"
        ) from None
    return onnxruntime


def _dynamic_shapes(example: Any) -> Any:
    batch = torch.export.Dim("batch")
    tokens = torch.export.Dim("tokens")

    def axes(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        if not t.is_floating_point() and t.dim() == 2:  # token ids / masks: (batch, tokens)
            return {0: batch, 1: tokens}
        return {0: batch}

    if isinstance(example, Mapping):
        return {k: axes(v) for k, v in example.items()}
    return tuple(axes(t) for t in example)


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat_outputs(o)]
    return []


def _check(
    ort: Any, path: Path, model: nn.Module, example_inputs: Any, check_inputs: Any
) -> tuple[float, float, list[str], int]:
    """Run the file at ``path`` with onnxruntime: the largest ``|onnx − torch|``, the
    largest ``|torch|``, the input names and the number of outputs."""
    check = example_inputs if check_inputs is None else check_inputs
    if isinstance(check, torch.Tensor):
        check = (check,)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    with torch.no_grad():
        if isinstance(check, Mapping):
            feed = {n: check[n].detach().cpu().numpy() for n in names}
            ref = _flat_outputs(model(**check))
        else:
            feed = {n: t.detach().cpu().numpy() for n, t in zip(names, check, strict=False)}
            ref = _flat_outputs(model(*check))
    got = session.run(None, feed)
    diff, scale = 0.0, 0.0
    for a, b in zip(got, ref, strict=False):
        r = b.detach().cpu().numpy()
        diff = max(diff, float(np.max(np.abs(np.asarray(a) - r))))
        scale = max(scale, float(np.max(np.abs(r))))
    return diff, scale, names, len(got)


class _NextTokenLogits(nn.Module):
    """A causal LM as its next-token logits, without the key/value cache (a
    ``DynamicCache`` in the outputs is no tensor the exporter can write)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)  # the model's mode is what export_onnx restores

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        from spectrim.evaluation._common import extract_logits

        return extract_logits(self.model(*args, **kwargs, use_cache=False))


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    check_inputs: Any = None,
    dynamic: bool = True,
    rtol: float | None = 1e-3,
) -> dict[str, Any]:
    """Export ``model`` to ONNX at ``path`` and check it with onnxruntime.

    Args:
        model: the model (run in eval mode; not modified).
        example_inputs: a tensor, a tuple of positional tensors, or a dict of keyword
            tensors (a tokenised batch) to trace the model with.
        path: the ``.onnx`` file to write (replaced atomically if it exists).
        check_inputs: inputs of the same form to compare ONNX and PyTorch on (default:
            ``example_inputs``); a different batch size exercises the dynamic axes.
        dynamic: make the batch axis (and a token axis of integer 2-D inputs) dynamic.
        rtol: refuse the file (raise, write nothing) when ``max_abs_diff`` exceeds this
            share of the largest PyTorch output; ``None``: report only.

    Returns:
        ``{"path", "bytes", "sha256", "inputs", "outputs", "max_abs_diff", "opset",
        "dynamic", "note"}``: ``max_abs_diff`` is the largest ``|onnx − torch|`` over all
        outputs.  Where the exporter fails on the dynamic axes, the file has the example's
        fixed shapes (``dynamic`` false, ``note`` says why; checked on the example).  A causal LM
        (a Hugging Face model that generates) is exported as its next-token logits, run
        without the key/value cache.

    Raises:
        ImportError: onnx / onnxruntime / onnxscript missing (names the package).
        RuntimeError: the exporter failed (its message, with the model's class), or the
            exported file's outputs differ from the model's by more than ``rtol``.
    """
    ort = _require()
    from spectrim.evaluation import is_causal_lm

    name = type(model).__name__
    if is_causal_lm(model):  # its one output: the next-token logits
        model = _NextTokenLogits(model)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    kwargs = dict(example_inputs) if isinstance(example_inputs, Mapping) else None
    args = () if kwargs is not None else tuple(example_inputs)
    was_training = model.training
    model.eval()
    tmp = target.with_name(f".{target.name}.tmp")
    note = None

    def run(shapes: Any) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, args, None, kwargs=kwargs, dynamo=True, dynamic_shapes=shapes,
                verbose=False,
            )  # fmt: skip
        if program is None:  # pragma: no cover - dynamo=True always returns a program
            raise RuntimeError("torch.onnx.export returned no program")
        program.save(str(tmp))

    try:
        try:
            try:
                run(_dynamic_shapes(kwargs if kwargs is not None else args) if dynamic else None)
            except Exception as exc:
                if not dynamic:
                    raise
                # the exporter fails on some models' dynamic axes (Hugging Face decoders'
                # masks with torch 2.14): the example's fixed shapes, checked on the example
                run(None)
                text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # the exporter's colours
                summary = text.partition("## Exception summary")[2].strip() or text.strip()
                first = summary.splitlines()[0][:200] if summary else type(exc).__name__
                note = f"exported with the example's fixed shapes; with dynamic axes: {first}"
                dynamic, check_inputs = False, None
        except Exception as exc:
            raise RuntimeError(f"ONNX export of {name} failed: {exc}") from exc
        # checked before it replaces anything: a file that computes otherwise is not kept
        diff, scale, names, n_out = _check(ort, tmp, model, example_inputs, check_inputs)
        if rtol is not None and diff > rtol * max(scale, 1e-30):
            raise RuntimeError(
                f"ONNX export of {name}: onnxruntime's outputs differ from PyTorch's by up "
                f"to {diff:.3g} (largest output {scale:.3g}, more than rtol={rtol:g} of "
                "it); the file was not written"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)
    data = target.read_bytes()
    opset = None
    try:
        import onnx

        opset = max((o.version for o in onnx.load(str(target)).opset_import), default=None)
    except Exception:  # pragma: no cover - the opset is informative only
        pass
    return {
        "path": str(target),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "inputs": names,
        "outputs": n_out,
        "max_abs_diff": diff,
        "opset": opset,
        "dynamic": dynamic,
        "note": note,
    }
