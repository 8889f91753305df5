"""spectrim.repair: distillation from the original model after compression."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import Any

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


def test_batches_sorted_by_class_are_mixed_before_training(data_root: Path) -> None:
    """Real images in batches of one class each, as a class-sorted folder gives them: the
    default mixes the examples across batches every epoch, and one epoch brings the
    pruned ResNet-20 closer to the original on held-out images than training on the
    batches as given (one class per step, BatchNorm statistics without the variance
    between classes)."""
    from spectrim.zoo import load_dataset, load_pretrained

    model = load_pretrained("resnet20-cifar10").eval()
    x, y = load_dataset("cifar10", "calib", limit=1024).tensors
    test = load_dataset("cifar10", "eval", limit=500)
    small, _ = spectrim.compress(model, x[:512], "l1", "width=0.5")
    order = torch.argsort(y, stable=True)
    by_class = list(x[order].split(64))
    assert max(len(set(c.tolist())) for c in y[order].split(64)) <= 2  # one class or two
    errors = {}
    for how in ("batches", "examples"):
        cfg = spectrim.RepairConfig(epochs=1, lr=0.01, shuffle=how)
        fixed, rep = spectrim.repair(small, model, by_class, cfg)
        assert rep.shuffle == how and rep.steps == 16 and rep.batch_norm == "recalibrate"
        errors[how] = evaluate(fixed, test, reference=model).fidelity["rel_l2"]
    # measured: relative logit error 0.765 as given, 0.670 mixed
    assert errors["examples"] < 0.93 * errors["batches"], errors


@pytest.mark.parametrize(
    ("loss", "optimizer", "lr"), [("mse", "sgd", 0.05), ("kl", "sgd", 0.05), ("mse", "adamw", 0.01)]
)
def test_both_losses_and_optimizers_distil_and_labels_are_ignored(
    loss: str, optimizer: str, lr: float
) -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 5)).eval()
    student = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 5))
    data = [(torch.randn(32, 6), torch.randint(0, 5, (32,))) for _ in range(10)]
    cfg = spectrim.RepairConfig(epochs=6, lr=lr, loss=loss, optimizer=optimizer)
    _, rep = spectrim.repair(student, teacher, data, cfg)
    assert rep.steps == 60 and rep.loss_last < 0.6 * rep.loss_first, rep.loss_curve


def test_hugging_face_outputs_padded_dict_batches_and_no_dropout() -> None:
    """A BERT's ``last_hidden_state`` is distilled on padded dict batches: the first
    step's loss is the relative error over the real tokens alone (brute force, the
    padded positions changed by nothing), the student runs without its dropout (the
    same loss on every seed), and the loss falls."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16,
    )  # fmt: skip
    teacher = transformers.BertModel(cfg).eval()
    ids = torch.randint(1, 60, (64, 10))
    mask = torch.ones_like(ids)
    mask[::2, 6:] = 0
    batches = [{"input_ids": i, "attention_mask": m} for i, m in zip(ids.split(16), mask.split(16))]
    small, _ = spectrim.compress(teacher, batches, "l1", "width=0.25")
    with torch.no_grad():  # a random BERT's FFN adds little: damage the student more
        for p in small.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
        b = batches[0]
        real = b["attention_mask"].bool()
        s, t = small(**b).last_hidden_state[real], teacher(**b).last_hidden_state[real]
        want = float((s - t).pow(2).sum() / t.pow(2).sum())
    firsts = [
        spectrim.repair(small, teacher, batches[:1], {"steps": 1, "seed": seed})[1].loss_first
        for seed in (0, 1)
    ]
    assert firsts == pytest.approx([want, want], rel=1e-5) and want > 0.01
    _, rep = spectrim.repair(small, teacher, batches, {"epochs": 8, "lr": 0.01})
    assert rep.loss_last < 0.8 * rep.loss_first, rep.loss_curve


class _Block(nn.Module):
    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.fc = nn.Linear(a, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class _Chain(nn.Module):
    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block(a, b) for a, b in itertools.pairwise(widths))
        self.head = nn.Linear(widths[-1], 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_features_add_the_block_outputs_relative_error() -> None:
    """The first step's loss with ``features=w`` is the output's relative squared error
    plus ``w`` times the mean over the chain's blocks whose outputs keep their shape
    (brute force; the narrowed first block is left out), and no hook stays behind."""
    torch.manual_seed(0)
    teacher, student = _Chain([6, 10, 8, 8]).eval(), _Chain([6, 4, 8, 8])
    x = torch.randn(32, 6)
    _, rep = spectrim.repair(student, teacher, [x], {"steps": 1, "features": 0.5})
    with torch.no_grad():
        t1, s1 = teacher.layers[0](x), student.layers[0](x)
        t2, s2 = teacher.layers[1](t1), student.layers[1](s1)
        t3, s3 = teacher.layers[2](t2), student.layers[2](s2)
        rel = lambda a, b: (a - b).pow(2).sum() / b.pow(2).sum()  # noqa: E731
        want = rel(student.head(s3), teacher.head(t3)) + 0.5 * (rel(s2, t2) + rel(s3, t3)) / 2
    assert rep.loss_first == pytest.approx(float(want), rel=1e-5)
    assert rep.config["features"] == 0.5
    assert all(not m._forward_hooks for m in [*teacher.modules(), *student.modules()])
    with pytest.raises(ValueError, match="features=-1"):
        spectrim.RepairConfig(features=-1)


def test_bad_settings_are_refused_by_name() -> None:
    net = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="epochs=0"):
        spectrim.RepairConfig(epochs=0)
    with pytest.raises(ValueError, match="loss='l1'"):
        spectrim.RepairConfig(loss="l1")
    with pytest.raises(ValueError, match="optimizer='adam'"):
        spectrim.RepairConfig(optimizer="adam")
    with pytest.raises(ValueError, match="shuffle='rows'"):
        spectrim.RepairConfig(shuffle="rows")
    with pytest.raises(ValueError, match=r"warmup=1 must be in \[0, 1\)"):
        spectrim.RepairConfig(warmup=1)
    with pytest.raises(ValueError, match=r"average=-0.1 must be in \[0, 1\)"):
        spectrim.RepairConfig(average=-0.1)
    with pytest.raises(ValueError, match="dropout='yes'"):
        spectrim.RepairConfig(dropout="yes")  # type: ignore[arg-type]
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
    """batch_norm="recalibrate": running statistics become the plain average over batches
    of the repair examples drawn across the batches given (brute force over the same
    draws), and training then leaves them alone."""
    from spectrim.repair import RECALIBRATION_BATCHES, _Pool

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten()).eval()
    data = [torch.randn(8, 3, 6, 6) + 2.0 for _ in range(4)]
    cfg = spectrim.RepairConfig(steps=1, lr=1e-12, momentum=0.0, batch_norm="recalibrate")
    fixed, rep = spectrim.repair(net, teacher, data, cfg)
    assert rep.shuffle == "examples"
    bn = fixed[1]
    draws = _Pool(data, "examples").draw(RECALIBRATION_BATCHES, cfg.seed)
    assert sorted(len(x) for x in draws) == [8] * 4
    with torch.no_grad():  # the conv barely moved (lr 1e-12); per batch, then averaged
        zs = [net[0](x) for x in draws]
    mean = torch.stack([z.mean((0, 2, 3)) for z in zs]).mean(0)
    var = torch.stack([z.var((0, 2, 3)) for z in zs]).mean(0)  # unbiased per batch
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)
    frozen, _ = spectrim.repair(net, teacher, data, {**cfg.to_dict(), "batch_norm": "freeze"})
    torch.testing.assert_close(frozen[1].running_mean, net[1].running_mean)


def test_auto_batch_norm_keeps_fitted_statistics_and_re_estimates_stale_ones() -> None:
    """batch_norm="auto" (the default) re-estimates the statistics only where that lowers
    the distillation loss: not after the residual output fit, which fitted the consumers
    to the shipped statistics, but after l1, whose narrower layers no longer match them.
    The probe leaves the statistics as they were when it keeps them."""
    from spectrim.zoo import load_dataset, load_pretrained

    model = load_pretrained("resnet20-cifar10").eval()
    x = load_dataset("cifar10", "calib", limit=512).tensors[0]
    cfg = spectrim.RepairConfig(steps=1, lr=1e-12, momentum=0.0)
    assert cfg.batch_norm == "auto"
    fitted, crep = spectrim.compress(model, x, "spectral", "macs=0.5")
    assert crep.sequential_fit == "residual"
    stale, _ = spectrim.compress(model, x, "l1", "width=0.5")
    chosen = {}
    for name, small in (("fitted", fitted), ("stale", stale)):
        fixed, rep = spectrim.repair(small, model, list(x.split(64)), cfg)
        losses = rep.batch_norm_losses
        assert set(losses) == {"freeze", "recalibrate"}
        assert rep.batch_norm == min(losses, key=losses.__getitem__)
        chosen[name] = rep.batch_norm
        if rep.batch_norm == "freeze":
            before, after = small.state_dict(), fixed.state_dict()
            assert all(torch.equal(after[k], v) for k, v in before.items() if "running" in k)
    # measured: fitted 0.181 kept against 0.225 re-estimated; stale 2.77 against 0.607
    assert chosen == {"fitted": "freeze", "stale": "recalibrate"}


def _fair_student() -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 5)).eval()
    student = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 5))
    with torch.no_grad():  # a fair start: the teacher's first 12 units
        student[0].weight.copy_(teacher[0].weight[:12])
        student[0].bias.copy_(teacher[0].bias[:12])
        student[2].weight.copy_(teacher[2].weight[:, :12])
        student[2].bias.copy_(teacher[2].bias)
    return teacher, student, [torch.randn(32, 6) for _ in range(8)]


def test_a_repair_that_ends_further_from_the_teacher_returns_the_model_as_given() -> None:
    """A recipe that drives the student away without reaching NaN (here a weight decay
    that pulls every weight to zero) gives back the model as it was, with a warning, and
    the report says so; a sound recipe keeps its result."""
    teacher, student, data = _fair_student()
    bad = spectrim.RepairConfig(epochs=3, lr=0.05, optimizer="adamw", weight_decay=50.0)
    with pytest.warns(RuntimeWarning, match="returned as it was given"):
        back, rep = spectrim.repair(student, teacher, data, bad)
    assert rep.kept == "given" and rep.probe_loss_end > rep.probe_loss_start
    assert rep.warnings and "rose from" in rep.warnings[0]
    assert all(torch.equal(back.state_dict()[k], v) for k, v in student.state_dict().items())
    good, rep = spectrim.repair(student, teacher, data, {"epochs": 3, "lr": 0.05})
    assert rep.kept == "repaired" and not rep.warnings
    assert rep.probe_loss_end < rep.probe_loss_start
    assert not all(torch.equal(good.state_dict()[k], v) for k, v in student.state_dict().items())


def test_average_returns_the_moving_average_of_the_weights_of_every_step() -> None:
    """average=a: the returned weights are w̄₁ = w₁, w̄ₖ = a·w̄ₖ₋₁ + (1 − a)·wₖ over the
    weights wₖ after each step (recorded from the training itself), not the last ones;
    a warmup changes the steps, not that rule."""
    teacher, student, data = _fair_student()
    for warmup in (0.0, 0.25):
        steps: list[list[torch.Tensor]] = []
        model = copy.deepcopy(student)

        def record(it: Any, model: nn.Module = model, steps: list[Any] = steps) -> Any:
            for batch in it:
                yield batch  # the loop trains on it before asking for the next one
                steps.append([p.detach().clone() for p in model.parameters()])

        cfg = {"epochs": 2, "lr": 0.05, "average": 0.8, "warmup": warmup}
        _, rep = spectrim.repair(model, teacher, data, cfg, inplace=True, progress=record)
        assert rep.kept == "repaired" and rep.steps == len(steps) == 16
        mean = steps[0]
        for w in steps[1:]:
            mean = [0.8 * m + 0.2 * x for m, x in zip(mean, w, strict=True)]
        for p, m, last in zip(model.parameters(), mean, steps[-1], strict=True):
            torch.testing.assert_close(p.detach(), m, rtol=1e-6, atol=1e-7)
            assert not torch.allclose(p.detach(), last)


def test_warmup_raises_the_learning_rate_linearly_then_follows_the_cosine() -> None:
    """The schedule's factor per step against its formula, brute force: with no warmup
    it is the cosine from 1 to 0 of before; a warmup of a quarter starts at 1/4 of the
    rise, reaches 1 at its end, and the cosine then runs over the remaining steps."""
    from spectrim.repair import _schedule

    total = 12
    for s in range(total + 1):
        assert _schedule(total, 0.0, s) == pytest.approx(0.5 * (1 + math.cos(math.pi * s / total)))
    rise = 3
    got = [_schedule(total, 0.25, s) for s in range(total + 1)]
    assert got[:rise] == pytest.approx([1 / 3, 2 / 3, 1.0])
    for s in range(rise, total + 1):
        want = 0.5 * (1 + math.cos(math.pi * (s - rise) / (total - rise)))
        assert got[s] == pytest.approx(want)
    # the first step of a warmup trains: the model moves
    teacher, student, data = _fair_student()
    moved, _ = spectrim.repair(student, teacher, data[:1], {"steps": 1, "warmup": 0.5})
    assert not torch.equal(moved[0].weight, student[0].weight)


def test_recalibrate_batch_norm_sees_the_variance_between_sorted_batches() -> None:
    """Batches sorted by class (each its own offset): the statistics are those of all the
    examples (the mean exactly, the variance within sampling error), not the average of
    each batch's own, which would miss the variance between the batches."""
    from spectrim.repair import recalibrate_batch_norm

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3)).eval()
    batches = [torch.randn(16, 2, 6, 6) + 3 * i for i in range(6)]
    assert recalibrate_batch_norm(net, batches) == 1
    assert not net.training and not net[1].training
    with torch.no_grad():
        acts = [net[0](b).transpose(0, 1).reshape(3, -1) for b in batches]
    every = torch.cat(acts, 1)
    torch.testing.assert_close(net[1].running_mean, every.mean(1), rtol=1e-5, atol=1e-5)
    pooled = every.var(1)
    per_batch = torch.stack([a.var(1) for a in acts]).mean(0)
    assert bool((pooled > 4 * per_batch).all())  # the batches' offsets dominate
    rel = (net[1].running_var - pooled).abs() / pooled
    assert float(rel.max()) < 0.15, (net[1].running_var, pooled)


def test_the_pool_mixes_examples_across_batches_every_epoch() -> None:
    """Every epoch is every example once, in as many batches as given, mixed across
    them, in a new order; dicts of tensors mix key by key; batches that differ in shape
    keep their examples together; shuffle="batches" keeps them as given."""
    from spectrim.repair import _Pool

    batches = [torch.arange(8 * i, 8 * i + 8, dtype=torch.float64)[:, None] for i in range(5)]
    pool = _Pool(batches, "examples")
    g = torch.Generator().manual_seed(0)
    e1, e2 = list(pool.epoch(g)), list(pool.epoch(g))
    for epoch in (e1, e2):
        assert len(epoch) == 5 and [len(x) for x in epoch] == [8] * 5
        assert torch.equal(torch.cat(epoch).flatten().sort().values, torch.arange(40.0).double())
    assert any(len({int(v) // 8 for v in x.flatten()}) > 1 for x in e1)  # mixed
    assert not all(torch.equal(a, b) for a, b in zip(e1, e2))  # a new order
    dicts = [{"input_ids": b.long(), "attention_mask": b.long() % 2, "flag": True} for b in batches]
    for x in _Pool(dicts, "examples").draw(5, 1):
        torch.testing.assert_close(x["attention_mask"], x["input_ids"] % 2)
        assert x["flag"] is True
    ragged = [torch.zeros(4, 3), torch.zeros(4, 5)]
    rp = _Pool(ragged, "examples")
    assert not rp.mixed and "batch 1" in (rp.reason or "")
    assert sorted(x.shape[1] for x in rp.draw(2, 0)) == [3, 5]
    kept = _Pool(batches, "batches")
    assert not kept.mixed and kept.reason is None
    drawn = kept.draw(5, 0)
    assert sorted(int(x[0]) for x in drawn) == [0, 8, 16, 24, 32]


def test_flip_crop_shifts_and_flips_every_image_on_its_own() -> None:
    """augment="flip-crop": each image is its own horizontal flip or not, shifted by its
    own offset of up to 4 pixels with zeros coming in (brute force over all 162 choices),
    and a batch of one image repeated gets many different views."""
    from spectrim.repair import _augment

    torch.manual_seed(0)
    img = torch.rand(3, 8, 8) + 1.0  # no zeros of its own
    x = img.expand(64, 3, 8, 8).contiguous()
    out = _augment(x, "flip-crop", torch.Generator().manual_seed(0))
    padded = [torch.nn.functional.pad(v, (4, 4, 4, 4)) for v in (img, img.flip(2))]
    views = {
        (f, dy, dx): p[:, dy : dy + 8, dx : dx + 8]
        for f, p in enumerate(padded)
        for dy in range(9)
        for dx in range(9)
    }
    found = [next(k for k, v in views.items() if torch.equal(v, o)) for o in out]
    assert len(set(found)) > 20  # each image its own view, not one per batch
    assert {f for f, _, _ in found} == {0, 1}
    assert torch.equal(_augment(x, None, torch.Generator()), x)


def test_mix_blends_each_example_with_another_and_both_models_see_the_blend() -> None:
    """mix=α: every row of a batch is λ·x_i + (1 − λ)·x_j for some row j of the same
    batch and λ in [0, 1] (found by brute force over j), one λ per example with
    Beta(1, 1)'s mean of 1/2; teacher and student are given the same blended batch;
    token ids are not blended, and the report says how many batches were not."""
    from spectrim.repair import _mix

    torch.manual_seed(0)
    x = torch.randn(2000, 5, dtype=torch.float64)
    y, done = _mix(x, 1.0, torch.Generator().manual_seed(0))
    assert done and y.shape == x.shape
    lams = []
    for i in range(0, 2000, 7):  # a sample of rows, each against every partner
        d = x - x[i]  # y_i - x_j = λ (x_i - x_j)  ⇔  y_i = λ x_i + (1 - λ) x_j
        num = ((y[i] - x) * -d).sum(1)
        den = (d * d).sum(1).clamp_min(1e-30)
        lam = num / den
        res = ((y[i] - x) + lam[:, None] * d).norm(dim=1)
        j = int(res.argmin())
        assert float(res[j]) < 1e-9 or torch.equal(y[i], x[i])
        if j != i:
            assert -1e-9 <= float(lam[j]) <= 1 + 1e-9
            lams.append(float(lam[j]))
    assert len(lams) > 250 and len({round(v, 6) for v in lams}) > 250  # one λ each
    assert abs(sum(lams) / len(lams) - 0.5) < 0.06
    assert _mix(x, 0.0, torch.Generator())[0] is x
    ids = torch.arange(12).reshape(3, 4)
    assert _mix(ids, 1.0, torch.Generator()) == (ids, False)

    teacher, student, data = _fair_student()
    seen: dict[str, list[torch.Tensor]] = {"t": [], "s": []}
    training = [False]  # the probe's batches (unmixed) run before and after the steps

    def steps(it: Any) -> Any:
        training[0] = True
        yield from it
        training[0] = False

    def keep(k: str) -> Any:
        return lambda _m, a: seen[k].append(a[0].detach().clone()) if training[0] else None

    hooks = [m[0].register_forward_pre_hook(keep(k)) for m, k in ((teacher, "t"), (student, "s"))]
    cfg = {"steps": 4, "mix": 0.4}
    try:
        _, rep = spectrim.repair(student, teacher, data, cfg, inplace=True, progress=steps)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen["t"]) == len(seen["s"]) == 4
    assert all(torch.equal(a, b) for a, b in zip(seen["t"], seen["s"], strict=True))
    examples = torch.cat(data)
    assert not any(any(torch.equal(r, e) for e in examples) for r in seen["s"][0][:4])
    assert rep.config["mix"] == 0.4 and not rep.warnings
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)).eval()
    tokens = [torch.randint(0, 10, (8, 3)) for _ in range(3)]
    _, rep = spectrim.repair(copy.deepcopy(emb), emb, tokens, {"steps": 3, "mix": 1.0})
    assert rep.warnings == [
        "repair: mix=1 left 3 of 3 batches unmixed: only floating-point tensor batches are blended"
    ]
    with pytest.raises(ValueError, match="mix=-1"):
        spectrim.RepairConfig(mix=-1)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_text_batches_mix_into_what_the_tokenizer_gives(
    side: str, minilm: tuple[nn.Module, Any], sts_train_sentences: list[str]
) -> None:
    """STS-B's training sentences in file order (captions, then news, then forums) and
    sorted by length within that, padded batch by batch to different lengths: the pool
    mixes them anyway, and every new batch is, key by key and to the token, what the
    real MiniLM tokenizer gives for its sentences padded together (on either side)."""
    import copy

    from spectrim.calibration.text import text_batches
    from spectrim.repair import _Pool

    tok = copy.copy(minilm[1])
    tok.padding_side = side
    texts = sts_train_sentences[::50][:96]
    texts = sorted(texts[:48], key=len) + sorted(texts[48:], key=len)
    batches = text_batches(texts, tok, batch_size=12, max_length=64)
    assert len({b["input_ids"].shape[1] for b in batches}) > 4  # eight lengths
    pool = _Pool(batches, "examples")
    assert pool.mixed and pool.reason is None
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(3))
    drawn = list(pool.epoch(g))
    assert len(drawn) == 8
    for chunk, got in zip(perm.tensor_split(8), drawn, strict=True):
        rows = sorted(chunk.tolist(), key=lambda i: i // 12)  # gathered batch by batch
        want = tok([texts[i] for i in rows], padding=True, truncation=True,
                   max_length=64, return_tensors="pt")  # fmt: skip
        assert set(got) == set(want)
        for key in want:
            assert torch.equal(got[key], want[key]), key
    mixed_sources = [len({int(i) // 48 for i in c}) for c in perm.tensor_split(8)]
    assert max(mixed_sources) == 2  # batches hold sentences from both halves
