"""Accuracy and output-fidelity metrics for comparing a compressed model with its original.

Accepted ``data``:

* a ``torch.utils.data.Dataset`` (e.g. ``TensorDataset(x, y)``), batched with ``batch_size``
  in order (no shuffling);
* a ``DataLoader``, used as is (its own batch size);
* any other iterable of batches, used as is;
* a tensor of inputs (no labels), split into chunks of ``batch_size``;
* a dict of keyword-argument tensors, used as one batch.

Each batch is ``x``, ``(x,)``, ``(x, y)`` (further elements are ignored) or a dict of keyword
arguments, where a ``"labels"`` (or ``"label"``) entry is taken as the labels and not passed to
the model (Hugging Face style). ``x`` itself may be a tensor, a tuple/list of positional
arguments or a dict of keyword arguments. Labels are integer class indices; negative labels
(e.g. ``-100``, the Hugging Face ignore index) are skipped by :func:`accuracy`.

Model outputs may be a tensor, an object with a ``logits`` tensor (``ModelOutput``), or a
tuple/list starting with one. Logits are ``(N, C)`` or ``(N, ..., C)`` (top-1 is taken over the
last dimension, metrics average over all positions); a single logit per example (``(N,)`` or
``(N, 1)``) is read as a binary classifier (class 1 iff the logit is positive, sigmoid
probabilities for the KL divergence).

Every function runs the models under ``torch.no_grad()`` in eval mode, restores each submodule's
``training`` flag afterwards, moves inputs to each model's device, and runs each model once per
batch; the comparison functions iterate the data once, so one-shot iterables (generators) work.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from torch.utils.data import TensorDataset
    >>> from spectrim.evaluation.metrics import evaluate
    >>> x = torch.randn(64, 4)
    >>> data = TensorDataset(x, (x[:, 0] > 0).long())
    >>> model = nn.Linear(4, 2)
    >>> result = evaluate(model, data, reference=model)
    >>> result.agreement, result.fidelity["max_abs"], result.n
    (1.0, 0.0, 64)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from spectrim.evaluation._common import (
    call_model,
    eval_mode,
    extract_logits,
    model_device,
    to_device,
)

__all__ = [
    "EvalResult",
    "accuracy",
    "accuracy_from_logits",
    "agreement",
    "agreement_from_logits",
    "embedding_fidelity",
    "evaluate",
    "is_causal_lm",
    "language_model_fidelity",
    "output_fidelity",
    "predict",
]

_LABEL_KEYS = ("labels", "label")


@dataclass
class EvalResult:
    """Result of :func:`evaluate`.

    Attributes:
        accuracy: top-1 accuracy of the model in ``[0, 1]``, ``None`` if the data has no labels.
        agreement: fraction of examples where the model's and the reference's top-1 predictions
            agree, ``None`` without a reference.
        fidelity: :func:`output_fidelity` of reference vs model (``rel_l2``, ``max_abs``, ``kl``),
            ``None`` without a reference.
        n: number of examples.
        reference_accuracy: top-1 accuracy of the reference, ``None`` without reference or labels.

    Example::

        >>> import json
        >>> json.dumps(EvalResult(accuracy=0.5, agreement=None, fidelity=None, n=2).to_dict())
        '{"accuracy": 0.5, "agreement": null, "fidelity": null, "n": 2, "reference_accuracy": null}'
    """

    accuracy: float | None
    agreement: float | None
    fidelity: dict[str, float] | None
    n: int
    reference_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view of the result."""
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Data handling
# --------------------------------------------------------------------------------------------


def _iter_batches(data: Any, batch_size: int) -> Iterator[Any]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(data, torch.Tensor):
        if data.dim() == 0:
            raise ValueError("data is a 0-dimensional tensor; expected a batch of inputs")
        for start in range(0, data.shape[0], batch_size):
            yield data[start : start + batch_size]
    elif isinstance(data, DataLoader):
        yield from data
    elif isinstance(data, Dataset):
        yield from DataLoader(data, batch_size=batch_size, shuffle=False)
    elif isinstance(data, Mapping):
        yield data
    elif isinstance(data, Iterable) and not isinstance(data, str | bytes):
        yield from data
    else:
        raise TypeError(
            f"unsupported data type {type(data).__name__!r}: expected a torch Dataset, a "
            "DataLoader, an iterable of batches, a tensor of inputs or a dict batch"
        )


def split_batch(batch: Any) -> tuple[Any, Any]:
    """Split a batch into (model inputs, labels or None): a tensor, ``(x,)``, ``(x, y)``
    or a dict whose ``labels`` / ``label`` key is the labels."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        inputs = dict(batch)
        labels = None
        for key in _LABEL_KEYS:
            if key in inputs:
                labels = inputs.pop(key)
                break
        return inputs, labels
    if isinstance(batch, tuple | list):
        if len(batch) == 0:
            raise ValueError("empty batch: expected x, (x,), (x, y) or a dict")
        if len(batch) == 1:
            return batch[0], None
        return batch[0], batch[1]
    raise TypeError(
        f"unsupported batch type {type(batch).__name__!r}: expected a tensor, a tuple/list "
        "(x, y) or a dict of keyword arguments"
    )


def _as_labels(labels: Any) -> torch.Tensor:
    tensor = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(
            f"labels must be integer class indices, got a tensor of dtype {tensor.dtype}"
        )
    return tensor.detach().to("cpu", torch.long)


def _collect(
    models: list[nn.Module], data: Any, batch_size: int
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Run every model once per batch; return their concatenated CPU logits and the labels."""
    for model in models:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(model).__name__!r}")
    devices = [model_device(model) for model in models]
    outputs: list[list[torch.Tensor]] = [[] for _ in models]
    labels: list[torch.Tensor] = []
    labelled: bool | None = None
    with eval_mode(*models), torch.no_grad():
        for index, batch in enumerate(_iter_batches(data, batch_size)):
            inputs, y = split_batch(batch)
            if labelled is None:
                labelled = y is not None
            elif labelled != (y is not None):
                raise ValueError(
                    f"batch {index} {'has' if y is not None else 'lacks'} labels but the first "
                    "batch did not agree; either every batch has labels or none does"
                )
            for model, device, sink in zip(models, devices, outputs):
                logits = extract_logits(call_model(model, to_device(inputs, device)))
                sink.append(logits.detach().cpu())
            if y is not None:
                labels.append(_as_labels(y))
    if not outputs[0]:
        raise ValueError("data yielded no batches")
    logits_per_model = [torch.cat(chunks, dim=0) for chunks in outputs]
    return logits_per_model, (torch.cat(labels, dim=0) if labelled else None)


# --------------------------------------------------------------------------------------------
# Metrics on logits
# --------------------------------------------------------------------------------------------


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``(M, C)`` float64 log-probabilities, one row per prediction position."""
    logits = logits.detach().to(torch.float64)
    if logits.dim() == 1 or logits.shape[-1] == 1:
        z = logits.reshape(-1)
        return torch.stack([F.logsigmoid(-z), F.logsigmoid(z)], dim=-1)
    return F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)


def _predictions(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 class per position, flattened."""
    if logits.dim() == 1 or logits.shape[-1] == 1:
        return (logits.reshape(-1) > 0).long()
    return logits.argmax(dim=-1).reshape(-1)


def accuracy_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``logits`` (``(..., classes)``); negative labels are ignored.

    >>> accuracy_from_logits(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
    0.5
    """
    positions = logits.shape if logits.dim() == 1 else logits.shape[:-1]
    if labels.numel() != math.prod(positions):
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match logits of shape "
            f"{tuple(logits.shape)} (expected {tuple(positions)})"
        )
    flat = labels.reshape(-1)
    keep = flat >= 0
    if not bool(keep.any()):
        raise ValueError("every label is negative (ignored); accuracy is undefined")
    return float((_predictions(logits)[keep] == flat[keep]).double().mean())


def agreement_from_logits(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """Share of positions where the two logits have the same top-1 class."""
    _check_same_shape(logits_a, logits_b)
    return float((_predictions(logits_a) == _predictions(logits_b)).double().mean())


def _fidelity(logits_a: torch.Tensor, logits_b: torch.Tensor) -> dict[str, float]:
    _check_same_shape(logits_a, logits_b)
    a = logits_a.detach().to(torch.float64)
    b = logits_b.detach().to(torch.float64)
    diff_norm = float(torch.linalg.vector_norm(a - b))
    ref_norm = float(torch.linalg.vector_norm(a))
    if ref_norm > 0:
        rel_l2 = diff_norm / ref_norm
    else:
        rel_l2 = 0.0 if diff_norm == 0 else math.inf
    max_abs = float((a - b).abs().max()) if a.numel() else 0.0
    log_p, log_q = _log_probs(a), _log_probs(b)
    kl = float((log_p.exp() * (log_p - log_q)).sum(dim=-1).mean().clamp_min(0.0))
    return {"rel_l2": rel_l2, "max_abs": max_abs, "kl": kl}


def _check_same_shape(logits_a: torch.Tensor, logits_b: torch.Tensor) -> None:
    if logits_a.shape != logits_b.shape:
        raise ValueError(
            f"the two models' outputs differ in shape: {tuple(logits_a.shape)} (model_a) vs "
            f"{tuple(logits_b.shape)} (model_b)"
        )


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def predict(model: nn.Module, data: Any, batch_size: int = 256) -> torch.Tensor:
    """Logits of *model* on every example of *data*, concatenated in order, on the CPU.

    ``batch_size`` applies to datasets and input tensors; DataLoaders and other iterables keep
    their own batching.

    Example::

        >>> logits = predict(nn.Linear(4, 3), torch.randn(10, 4), batch_size=4)
        >>> tuple(logits.shape)
        (10, 3)
    """
    (logits,), _ = _collect([model], data, batch_size)
    return logits


def accuracy(model: nn.Module, data: Any, batch_size: int = 256) -> float:
    """Top-1 accuracy of *model* on labelled *data*, in ``[0, 1]``.

    Raises ``ValueError`` if the data has no labels.

    Example::

        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> accuracy(nn.Identity(), [(x, torch.tensor([0, 0]))])
        0.5
    """
    (logits,), labels = _collect([model], data, batch_size)
    if labels is None:
        raise ValueError("accuracy needs labelled data: batches of (x, y) or dicts with 'labels'")
    return accuracy_from_logits(logits, labels)


def agreement(model_a: nn.Module, model_b: nn.Module, data: Any, batch_size: int = 256) -> float:
    """Fraction of examples on which the two models' top-1 predictions are equal.

    Labels are not needed. Each model runs once per batch, in a single pass over *data*.

    Example::

        >>> model = nn.Linear(4, 3)
        >>> agreement(model, model, torch.randn(8, 4))
        1.0
    """
    (logits_a, logits_b), _ = _collect([model_a, model_b], data, batch_size)
    return agreement_from_logits(logits_a, logits_b)


def output_fidelity(
    model_a: nn.Module, model_b: nn.Module, data: Any, batch_size: int = 256
) -> dict[str, float]:
    """How closely *model_b* reproduces the logits of *model_a* (the reference).

    Returns a dict with ``rel_l2`` (``‖ya − yb‖ / ‖ya‖`` over all logits), ``max_abs``
    (``max |ya − yb|``) and ``kl`` (mean over examples of ``KL(softmax(ya) ‖ softmax(yb))``,
    in nats). Computed in float64.

    Example::

        >>> model = nn.Linear(4, 3)
        >>> output_fidelity(model, model, torch.randn(8, 4))
        {'rel_l2': 0.0, 'max_abs': 0.0, 'kl': 0.0}
    """
    (logits_a, logits_b), _ = _collect([model_a, model_b], data, batch_size)
    return _fidelity(logits_a, logits_b)


def evaluate(
    model: nn.Module, data: Any, reference: nn.Module | None = None, batch_size: int = 256
) -> EvalResult:
    """Accuracy of *model* and, given a *reference* (the original model), agreement and fidelity.

    One pass over *data*: each model computes its logits once per batch. ``accuracy`` is
    ``None`` when the data has no labels; ``agreement`` and ``fidelity`` are ``None`` without a
    reference; fidelity treats the reference as ``ya`` in :func:`output_fidelity`.

    Example::

        >>> x = torch.randn(32, 4)
        >>> evaluate(nn.Linear(4, 2), x).to_dict()["accuracy"] is None
        True
    """
    models = [model] if reference is None else [model, reference]
    logits, labels = _collect(models, data, batch_size)
    acc = accuracy_from_logits(logits[0], labels) if labels is not None else None
    if reference is None:
        return EvalResult(accuracy=acc, agreement=None, fidelity=None, n=int(logits[0].shape[0]))
    return EvalResult(
        accuracy=acc,
        agreement=agreement_from_logits(logits[1], logits[0]),
        fidelity=_fidelity(logits[1], logits[0]),
        n=int(logits[0].shape[0]),
        reference_accuracy=accuracy_from_logits(logits[1], labels) if labels is not None else None,
    )


def embedding_fidelity(
    model: nn.Module, reference: nn.Module, batches: Iterable[Mapping[str, Any]]
) -> dict[str, float]:
    """How close a compressed encoder's sentence embeddings stay to the original's.

    Each batch is a dict of keyword arguments with an ``attention_mask`` (tokenised text);
    a model's embedding of a text is the mean of its output token vectors
    (``last_hidden_state``, or the first output) over the real tokens, as
    sentence-transformers pools.  Returns ``cosine_mean`` / ``cosine_min`` (the cosine of
    each text's two embeddings; 1 is identical) and ``n`` (texts).

    Example::

        >>> import transformers
        >>> cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=16, vocab_size=30)
        >>> bert = transformers.BertModel(cfg).eval()
        >>> batch = {"input_ids": torch.randint(0, 30, (3, 5)), "attention_mask": torch.ones(3, 5)}
        >>> embedding_fidelity(bert, bert, [batch])["cosine_min"] > 0.9999
        True
    """
    cos: list[torch.Tensor] = []
    with eval_mode(model, reference), torch.no_grad():
        for batch in batches:
            if not isinstance(batch, Mapping) or "attention_mask" not in batch:
                raise ValueError(
                    "embedding_fidelity needs dict batches with an 'attention_mask' "
                    "(tokenised text)"
                )
            pooled = []
            for m in (model, reference):
                out = call_model(m, to_device(dict(batch), model_device(m)))
                h = getattr(out, "last_hidden_state", None)
                if not isinstance(h, torch.Tensor):
                    h = out[0] if isinstance(out, (tuple, list)) else out
                if not isinstance(h, torch.Tensor) or h.dim() != 3:
                    raise ValueError(
                        f"{type(m).__name__} does not return token vectors (batch, tokens, dim)"
                    )
                mask = batch["attention_mask"].to(h.device).unsqueeze(-1).to(h.dtype)
                pooled.append(((h * mask).sum(1) / mask.sum(1).clamp_min(1)).double().cpu())
            cos.append(F.cosine_similarity(pooled[0], pooled[1], dim=-1))
    if not cos:
        raise ValueError("embedding_fidelity: no batches")
    c = torch.cat(cos)
    return {"cosine_mean": float(c.mean()), "cosine_min": float(c.min()), "n": int(c.numel())}


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face model that generates text (``can_generate()``):
    its outputs are next-token logits, not token vectors to pool.

    Example::

        >>> is_causal_lm(nn.Linear(2, 2))
        False
    """
    can = getattr(model, "can_generate", None)
    return bool(callable(can) and can())


def language_model_fidelity(
    model: nn.Module, reference: nn.Module, batches: Iterable[Mapping[str, Any]]
) -> dict[str, float]:
    """How close a compressed causal LM stays to the original on tokenised text.

    At every real position that has a real next token (``attention_mask`` 1 at both; any
    padding side), both models' next-token distributions are compared.  Returns
    ``perplexity`` and ``reference_perplexity`` (exp of the mean cross-entropy of the
    true next tokens), ``agreement`` (the share of positions where the two predict the
    same top token), ``kl_mean`` (the mean ``KL(reference ‖ model)`` in nats), ``n``
    (texts) and ``tokens`` (positions scored).

    Example::

        >>> import transformers
        >>> cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=30)
        >>> gpt = transformers.GPT2LMHeadModel(cfg).eval()
        >>> batch = {"input_ids": torch.randint(0, 30, (2, 6)), "attention_mask": torch.ones(2, 6)}
        >>> r = language_model_fidelity(gpt, gpt, [batch])
        >>> r["agreement"], r["kl_mean"] < 1e-12, r["tokens"]
        (1.0, True, 10)
    """
    nll, ref_nll, kl, agree, tokens, texts = 0.0, 0.0, 0.0, 0, 0, 0
    with eval_mode(model, reference), torch.no_grad():
        for batch in batches:
            if not isinstance(batch, Mapping) or "input_ids" not in batch:
                raise ValueError(
                    "language_model_fidelity needs dict batches with 'input_ids' (tokenised text)"
                )
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask
            real = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)  # position t predicts token t + 1
            logp = []
            for m in (model, reference):
                try:
                    logits = extract_logits(call_model(m, to_device(dict(batch), model_device(m))))
                except TypeError:
                    logits = None
                if logits is None or logits.dim() != 3:
                    raise ValueError(
                        f"{type(m).__name__} does not return next-token logits "
                        "(batch, tokens, vocabulary)"
                    )
                logp.append(F.log_softmax(logits[:, :-1].double().cpu()[real], dim=-1))
            target = ids[:, 1:][real].cpu()
            nll -= float(logp[0].gather(1, target[:, None]).sum())
            ref_nll -= float(logp[1].gather(1, target[:, None]).sum())
            kl += float((logp[1].exp() * (logp[1] - logp[0])).sum())
            agree += int((logp[0].argmax(-1) == logp[1].argmax(-1)).sum())
            tokens += int(target.numel())
            texts += int(ids.shape[0])
    if not tokens:
        raise ValueError("language_model_fidelity: no position with a next token to score")
    return {
        "perplexity": math.exp(nll / tokens),
        "reference_perplexity": math.exp(ref_nll / tokens),
        "agreement": agree / tokens,
        "kl_mean": kl / tokens,
        "n": texts,
        "tokens": tokens,
    }
