"""Tests of spectrim.evaluation.metrics on small synthetic data with known answers."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from scipy.special import softmax
from scipy.stats import entropy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from spectrim.evaluation import (
    EvalResult,
    accuracy,
    agreement,
    evaluate,
    output_fidelity,
    predict,
)

# --------------------------------------------------------------------------------------------
# Fixtures: two well-separated blobs and classifiers with known accuracy
# --------------------------------------------------------------------------------------------


def _blobs(n_per_class: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 has x0 in [-4, -2], class 1 has x0 in [2, 4]; x1 is noise."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.rand(2 * n_per_class, 2, generator=g) * 2 - 1
    y = torch.arange(2).repeat_interleave(n_per_class)
    x = offsets.clone()
    x[:, 0] += torch.where(y == 1, 3.0, -3.0)
    perm = torch.randperm(2 * n_per_class, generator=g)
    return x[perm], y[perm]


def _classifier(w0: float) -> nn.Linear:
    """Linear(2, 2) whose logit difference (class 1 − class 0) is 2·w0·x0."""
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-w0, 0.0], [w0, 0.0]]))
        model.bias.zero_()
    return model


class _Counting(nn.Module):
    """Wraps a model and counts its forward calls."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


def _mlp(seed: int = 0, classes: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, classes))


def _permute_classes(model: nn.Sequential, order: list[int]) -> nn.Sequential:
    """Copy of an ``_mlp`` whose output classes are reordered: new class i = old class order[i]."""
    copied = copy.deepcopy(model)
    head = copied[2]
    assert isinstance(head, nn.Linear)
    with torch.no_grad():
        head.weight.copy_(head.weight[order].clone())
        head.bias.copy_(head.bias[order].clone())
    return copied


# --------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------


def test_predict_matches_direct_forward_for_every_data_form() -> None:
    torch.manual_seed(1)
    model = _mlp()
    x, y = torch.randn(23, 5), torch.randint(0, 3, (23,))
    with torch.no_grad():
        expected = model(x)
    forms: dict[str, Any] = {
        "dataset": TensorDataset(x, y),
        "unlabelled dataset": TensorDataset(x),
        "loader": DataLoader(TensorDataset(x, y), batch_size=4),
        "list of batches": [(x[:10], y[:10]), (x[10:], y[10:])],
        "list of tensors": [x[:7], x[7:]],
        "generator": ((x[i : i + 5], y[i : i + 5]) for i in range(0, 23, 5)),
        "tensor": x,
    }
    for name, data in forms.items():
        logits = predict(model, data, batch_size=6)
        assert logits.device.type == "cpu"
        torch.testing.assert_close(logits, expected, msg=name)


def test_predict_dict_batches_and_model_output_objects() -> None:
    class TokenClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
            pooled = (self.embed(input_ids) * attention_mask[..., None]).sum(1)
            return SimpleNamespace(logits=self.head(pooled), hidden=pooled)

    torch.manual_seed(0)
    model = TokenClassifier()
    ids, mask = torch.randint(0, 20, (8, 6)), torch.ones(8, 6)
    labels = torch.randint(0, 3, (8,))
    batches = [
        {"input_ids": ids[:5], "attention_mask": mask[:5], "labels": labels[:5]},
        {"input_ids": ids[5:], "attention_mask": mask[5:], "labels": labels[5:]},
    ]
    with torch.no_grad():
        expected = model(ids, mask).logits
    torch.testing.assert_close(predict(model, batches), expected)
    manual = float((expected.argmax(-1) == labels).double().mean())
    assert accuracy(model, batches) == pytest.approx(manual)


# --------------------------------------------------------------------------------------------
# accuracy
# --------------------------------------------------------------------------------------------


def test_accuracy_on_separable_data() -> None:
    x, y = _blobs()
    data = TensorDataset(x, y)
    assert accuracy(_classifier(1.0), data) == 1.0
    assert accuracy(_classifier(-1.0), data) == 0.0  # every prediction flipped


def test_accuracy_fraction_is_exact() -> None:
    x, y = _blobs(n_per_class=30)
    # a constant classifier predicting class 0 is right on class 0 only: 30 of 40 examples
    keep = torch.cat([torch.nonzero(y == 0)[:, 0], torch.nonzero(y == 1)[:10, 0]])
    constant = nn.Linear(2, 2)
    with torch.no_grad():
        constant.weight.zero_()
        constant.bias.copy_(torch.tensor([1.0, 0.0]))
    assert accuracy(constant, TensorDataset(x[keep], y[keep]), batch_size=7) == 0.75


def test_accuracy_sequence_logits_skip_ignored_labels() -> None:
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]])  # predictions 0, 1, 0
    labels = torch.tensor([[0, 0, -100]])  # right, wrong, ignored
    assert accuracy(nn.Identity(), [(logits, labels)]) == 0.5


def test_accuracy_single_logit_is_binary() -> None:
    z = torch.tensor([[-2.0], [3.0], [0.5], [-0.1]])  # classes 0, 1, 1, 0
    assert accuracy(nn.Identity(), [(z, torch.tensor([0, 1, 0, 0]))]) == 0.75


def test_accuracy_without_labels_raises() -> None:
    with pytest.raises(ValueError, match="labelled"):
        accuracy(_mlp(), torch.randn(4, 5))


# --------------------------------------------------------------------------------------------
# agreement and fidelity
# --------------------------------------------------------------------------------------------


def test_agreement_with_itself_is_one() -> None:
    x = torch.randn(50, 5)
    model = _mlp()
    assert agreement(model, model, x) == 1.0
    assert agreement(model, copy.deepcopy(model), TensorDataset(x)) == 1.0


def test_agreement_with_label_permuted_copy() -> None:
    torch.manual_seed(3)
    model = _mlp(seed=3)
    x = torch.randn(200, 5)
    permuted = _permute_classes(model, [0, 2, 1])  # exchange classes 1 and 2
    with torch.no_grad():
        predicted = model(x).argmax(-1)
    value = agreement(model, permuted, x, batch_size=32)
    # the copy agrees exactly where the original predicts the unpermuted class 0
    assert value == pytest.approx(float((predicted == 0).double().mean()))
    assert value < 1.0
    cyclic = _permute_classes(model, [1, 2, 0])  # no class keeps its index
    assert agreement(model, cyclic, x) == 0.0


def test_fidelity_of_identical_models_is_zero() -> None:
    model = _mlp()
    x = torch.randn(40, 5)
    assert output_fidelity(model, copy.deepcopy(model), x) == {
        "rel_l2": 0.0,
        "max_abs": 0.0,
        "kl": 0.0,
    }


def test_fidelity_of_scaled_logits_matches_hand_computation() -> None:
    model = _mlp()
    doubled = copy.deepcopy(model)
    head = doubled[2]
    assert isinstance(head, nn.Linear)
    with torch.no_grad():
        head.weight.mul_(2)
        head.bias.mul_(2)
    x = torch.randn(40, 5)
    with torch.no_grad():
        ya = model(x).double().numpy()
    fidelity = output_fidelity(model, doubled, x, batch_size=16)
    assert fidelity["rel_l2"] == pytest.approx(1.0, rel=1e-5)  # ‖2y − y‖ / ‖y‖
    assert fidelity["max_abs"] == pytest.approx(abs(ya).max(), rel=1e-5)
    expected_kl = entropy(softmax(ya, axis=1), softmax(2 * ya, axis=1), axis=1).mean()
    assert fidelity["kl"] == pytest.approx(expected_kl, rel=1e-4)
    assert fidelity["kl"] > 0


def test_output_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 2\)"):
        output_fidelity(_mlp(classes=3), _mlp(classes=2), torch.randn(4, 5))


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------


def test_evaluate_runs_each_model_once_per_batch_on_a_generator() -> None:
    x, y = _blobs()
    original = _Counting(_classifier(1.0))
    compressed = _Counting(_classifier(-1.0))

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(x), 25):
            yield x[start : start + 25], y[start : start + 25]

    result = evaluate(compressed, batches(), reference=original)
    n_batches = -(-len(x) // 25)
    assert original.calls == compressed.calls == n_batches
    assert result.n == len(x)
    assert result.accuracy == 0.0
    assert result.reference_accuracy == 1.0
    assert result.agreement == 0.0
    assert result.fidelity is not None
    assert result.fidelity["rel_l2"] == pytest.approx(2.0)  # logits negated: ‖−y − y‖ / ‖y‖
    json.loads(json.dumps(result.to_dict()))


def test_evaluate_without_reference_or_labels() -> None:
    x, y = _blobs()
    result = evaluate(_classifier(1.0), TensorDataset(x, y))
    assert result == EvalResult(accuracy=1.0, agreement=None, fidelity=None, n=len(x))
    unlabelled = evaluate(_classifier(1.0), x, reference=_classifier(1.0))
    assert unlabelled.accuracy is None and unlabelled.reference_accuracy is None
    assert unlabelled.agreement == 1.0
    assert unlabelled.to_dict()["fidelity"] == {"rel_l2": 0.0, "max_abs": 0.0, "kl": 0.0}


def test_models_left_in_their_training_state() -> None:
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.9), nn.BatchNorm1d(8), nn.Linear(8, 3))
    model.train()
    model[2].eval()
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(32, 5)
    first = predict(model, x)
    second = predict(model, x)
    torch.testing.assert_close(first, second)  # dropout off: eval mode was used
    evaluate(model, x, reference=model)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not first.requires_grad and torch.is_grad_enabled()


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_unsupported_data_and_batches_name_the_type() -> None:
    model = _mlp()
    with pytest.raises(TypeError, match="'int'"):
        predict(model, 42)
    with pytest.raises(TypeError, match="'str'"):
        predict(model, ["not a batch"])
    with pytest.raises(TypeError, match=r"nn\.Module, got 'str'"):
        evaluate(model, torch.randn(2, 5), reference="original")  # type: ignore[arg-type]


def test_invalid_labels_and_data_raise() -> None:
    model = _mlp()
    x = torch.randn(6, 5)
    with pytest.raises(ValueError, match="integer class indices"):
        accuracy(model, [(x, torch.zeros(6))])
    with pytest.raises(ValueError, match="labels"):
        evaluate(model, [(x, torch.zeros(6, dtype=torch.long)), x])
    with pytest.raises(ValueError, match="no batches"):
        predict(model, [])
    with pytest.raises(ValueError, match="do not match"):
        accuracy(model, [(x, torch.zeros(5, dtype=torch.long))])
    with pytest.raises(ValueError, match="batch_size"):
        predict(model, x, batch_size=0)


def test_language_model_fidelity_matches_the_models_own_loss() -> None:
    """Brute force: the perplexity is exp of Hugging Face's own causal-LM loss over the
    same real next tokens (padding excluded by ``labels=-100``); a model against itself
    agrees everywhere with zero KL, and a different model does neither."""
    transformers = pytest.importorskip("transformers")
    from spectrim.evaluation import is_causal_lm, language_model_fidelity

    def gpt(seed: int) -> Any:
        torch.manual_seed(seed)
        cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40)
        return transformers.GPT2LMHeadModel(cfg).eval()

    model, other = gpt(0), gpt(1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[2, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        loss = float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    same = language_model_fidelity(model, model, [{"input_ids": ids, "attention_mask": mask}])
    assert same["reference_perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert same["perplexity"] == pytest.approx(same["reference_perplexity"], rel=1e-12)
    assert same["tokens"] == 8 + 5 + 3 and same["n"] == 3
    assert same["agreement"] == 1.0 and abs(same["kl_mean"]) < 1e-12
    diff = language_model_fidelity(other, model, [{"input_ids": ids, "attention_mask": mask}])
    assert diff["reference_perplexity"] == pytest.approx(same["reference_perplexity"])
    assert diff["kl_mean"] > 1e-4 and diff["agreement"] < 1.0
    assert is_causal_lm(model) and not is_causal_lm(transformers.BertModel(
        transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=16, vocab_size=30)))  # fmt: skip
