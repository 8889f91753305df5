"""spectrim.repair: distillation from the original model after compression."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import spectrim
from spectrim.evaluation import evaluate


def test_repair_brings_a_pruned_resnet20_back_towards_the_original(data_root: Path) -> None:
    """The pretrained CIFAR-10 ResNet-20 at half width by l1 (no correction) loses most of
    its accuracy (its BatchNorm statistics no longer fit); recalibrating them and two
    epochs of distillation on 512 unlabelled images win much of it back,
    measured on held-out test images, and leave the compressed model untouched."""
    from spectrim.zoo import load_dataset, load_pretrained

    model = load_pretrained("resnet20-cifar10").eval()
    x = load_dataset("cifar10", "calib", limit=512).tensors[0]
    test = load_dataset("cifar10", "eval", limit=500)
    small, _ = spectrim.compress(model, x, "l1", "width=0.5")
    before_state = {k: v.clone() for k, v in small.state_dict().items()}
    before = evaluate(small, test, reference=model)
    cfg = spectrim.RepairConfig(epochs=2, lr=0.01, augment="flip-crop")
    fixed, rep = spectrim.repair(small, model, list(x.split(64)), cfg)
    after = evaluate(fixed, test, reference=model)
    assert rep.steps == 16 and rep.examples == 1024 and rep.loss_last < 0.85 * rep.loss_first
    # measured: agreement with the original 0.148 -> 0.624 (BatchNorm recalibrated first)
    assert after.agreement > before.agreement + 0.25, (before.agreement, after.agreement)
    assert all(torch.equal(v, before_state[k]) for k, v in small.state_dict().items())
    assert not fixed.training and rep.config["augment"] == "flip-crop"


@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_both_losses_distil_and_labels_are_ignored(loss: str) -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 5)).eval()
    student = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 5))
    data = [(torch.randn(32, 6), torch.randint(0, 5, (32,))) for _ in range(10)]
    cfg = spectrim.RepairConfig(epochs=6, lr=0.05, loss=loss)
    _, rep = spectrim.repair(student, teacher, data, cfg)
    assert rep.steps == 60 and rep.loss_last < 0.6 * rep.loss_first, rep.loss_curve


def test_hugging_face_outputs_and_dict_batches() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16,
    )  # fmt: skip
    teacher = transformers.BertModel(cfg).eval()
    ids = torch.randint(1, 60, (64, 10))
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids.split(16)]
    small, _ = spectrim.compress(teacher, batches, "l1", "width=0.5")
    _, rep = spectrim.repair(small, teacher, batches, {"epochs": 8, "lr": 0.05})
    assert rep.loss_last < rep.loss_first


def test_bad_settings_are_refused_by_name() -> None:
    net = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="epochs=0"):
        spectrim.RepairConfig(epochs=0)
    with pytest.raises(ValueError, match="loss='l1'"):
        spectrim.RepairConfig(loss="l1")
    with pytest.raises(ValueError, match="unknown option"):
        spectrim.repair(net, net, [torch.randn(4, 3)], {"epoch": 1})
    with pytest.raises(ValueError, match="no data"):
        spectrim.repair(net, net, [])
    with pytest.raises(ValueError, match="needs steps="):
        spectrim.repair(net, net, iter([torch.randn(4, 3)]))
    with pytest.raises(ValueError, match=r"output has shape \(4, 1\)"):
        spectrim.repair(nn.Linear(3, 1), net, [torch.randn(4, 3)])
    # an iterator with steps= works
    _, rep = spectrim.repair(nn.Linear(3, 2), net, iter([torch.randn(4, 3)] * 3), {"steps": 3})
    assert rep.steps == 3


def test_compress_repairs_when_asked() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = torch.randn(512, 8)
    small, rep = spectrim.compress(net, x, "l1", "width=0.25", repair={"epochs": 3, "lr": 0.05})
    plain, _ = spectrim.compress(net, x, "l1", "width=0.25")
    assert rep.repair is not None and rep.repair["steps"] == 3 * len(spectrim.as_batches(x))
    with torch.no_grad():
        y, test = net(x[:128]), x[:128]
        err = float((small(test) - y).norm() / y.norm())
        err0 = float((plain(test) - y).norm() / y.norm())
    assert err < 0.8 * err0, (err, err0)
    assert spectrim.CompressionReport.from_dict(rep.to_dict()).repair == rep.repair
    with pytest.raises(ValueError, match="not inplace=True"):
        spectrim.compress(net, x, "l1", "width=0.5", repair={"epochs": 1}, inplace=True)


def test_recalibration_re_estimates_batch_norm_statistics() -> None:
    """batch_norm="recalibrate": running statistics become the plain average over the
    repair batches (brute force), and training then leaves them alone."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten()).eval()
    data = [torch.randn(8, 3, 6, 6) + 2.0 for _ in range(4)]
    cfg = spectrim.RepairConfig(steps=1, lr=1e-12, momentum=0.0)
    fixed, _ = spectrim.repair(net, teacher, data, cfg)
    bn = fixed[1]
    with torch.no_grad():  # the conv barely moved (lr 1e-12); per batch, then averaged
        zs = [net[0](x) for x in data]
    mean = torch.stack([z.mean((0, 2, 3)) for z in zs]).mean(0)
    var = torch.stack([z.var((0, 2, 3)) for z in zs]).mean(0)  # unbiased per batch
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)
    frozen, _ = spectrim.repair(net, teacher, data, {**cfg.to_dict(), "batch_norm": "freeze"})
    torch.testing.assert_close(frozen[1].running_mean, net[1].running_mean)


def test_recalibrate_batch_norm_is_the_average_of_the_batch_statistics() -> None:
    from spectrim.repair import recalibrate_batch_norm

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3)).eval()
    batches = [torch.randn(8, 2, 6, 6) * (i + 1) + i for i in range(3)]
    assert recalibrate_batch_norm(net, batches) == 1
    assert not net.training and not net[1].training
    with torch.no_grad():
        acts = [net[0](b).transpose(0, 1).reshape(3, -1) for b in batches]
    mean = torch.stack([a.mean(1) for a in acts]).mean(0)  # brute force: per-batch, averaged
    var = torch.stack([a.var(1, unbiased=True) for a in acts]).mean(0)
    torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[1].running_var, var, rtol=1e-5, atol=1e-5)
