"""Randomized row sketches (spectrim.calibration.sketch) and the memory plan that picks them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrim.calibration.gram import rows_from_activation
from spectrim.calibration.sketch import (
    MIN_SKETCH_ROWS,
    OMEGA_COLUMNS,
    SKETCH_FROM,
    RowSketch,
    default_stats_memory,
    plan_sketches,
)
from spectrim.config import CompressConfig, parse_bytes


def test_the_sketch_is_omega_times_the_rows_batch_by_batch() -> None:
    """Brute force: every update adds Ω(seed, batch, call) @ X, with a fresh Ω per call."""
    sk = RowSketch(7, rows=5, seed=3)
    x1, x2, x3 = torch.randn(OMEGA_COLUMNS + 20, 7), torch.randn(13, 7), torch.randn(9, 7)
    sk.begin(4)
    sk.update(x1)
    sk.update(x2)
    sk.begin(9)
    sk.update(x3)
    want = (
        sk.omega(OMEGA_COLUMNS + 20, 4, 0).double() @ x1.double()
        + sk.omega(13, 4, 1).double() @ x2.double()
        + sk.omega(9, 9, 0).double() @ x3.double()
    )
    np.testing.assert_allclose(sk.sketch_numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    x = torch.cat([x1, x2, x3])
    np.testing.assert_allclose(sk.energies_numpy(), (x.double() ** 2).sum(0).numpy(), rtol=1e-6)
    assert sk.count == OMEGA_COLUMNS + 42
    # different batches, calls and seeds draw different Ω; the same ones the same Ω
    assert not torch.equal(sk.omega(9, 4, 0), sk.omega(9, 9, 0))
    assert not torch.equal(sk.omega(9, 4, 0), sk.omega(9, 4, 1))
    assert not torch.equal(sk.omega(9, 4, 0), RowSketch(7, 5, seed=4).omega(9, 4, 0))
    torch.testing.assert_close(sk.omega(9, 4, 0), RowSketch(7, 5, seed=3).omega(9, 4, 0))


def test_the_sketch_gram_is_unbiased() -> None:
    """E[YᵀY] = ZᵀZ: the mean over 400 seeds is within a few standard errors."""
    z = torch.randn(60, 4, dtype=torch.float64) @ torch.randn(4, 6, dtype=torch.float64)
    mean = np.zeros((6, 6))
    for seed in range(400):
        sk = RowSketch(6, rows=3, seed=seed)
        sk.update(z)
        y = sk.sketch_numpy()
        mean += y.T @ y / 400
    g = (z.T @ z).numpy()
    assert np.abs(mean - g).max() < 0.1 * np.abs(g).max()


def test_a_split_over_processes_gives_the_one_process_sketch() -> None:
    """Ω depends on the batch's index in the whole set, so sketches of two shards summed
    (what an all_reduce does) equal the sketch of all batches."""
    batches = [torch.randn(16, 9) for _ in range(4)]
    whole, even, odd = (RowSketch(9, rows=4, seed=1) for _ in range(3))
    for i, b in enumerate(batches):
        whole.begin(i)
        whole.update(b)
        part = even if i % 2 == 0 else odd
        part.begin(i)
        part.update(b)
    even.set_flat(even.flat() + odd.flat())
    np.testing.assert_allclose(even.sketch_numpy(), whole.sketch_numpy(), rtol=1e-12)
    assert even.count == whole.count == 64


def test_activations_are_read_as_rows() -> None:
    x = torch.randn(3, 5, 4, 4)
    a, b = RowSketch(5, rows=3), RowSketch(5, rows=3)
    a.update_activation(x, 1)
    b.update(rows_from_activation(x, 1))
    np.testing.assert_allclose(a.sketch_numpy(), b.sketch_numpy(), rtol=1e-6)


def test_bad_rows_are_refused_before_anything_is_added() -> None:
    sk = RowSketch(4, rows=2)
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        sk.update(torch.randn(3, 5))
    with pytest.raises(ValueError, match="floating-point"):
        sk.update(torch.ones(3, 4, dtype=torch.long))
    bad = torch.randn(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        sk.update(bad)
    assert sk.count == 0 and not sk.sketch_numpy().any()
    with pytest.raises(ValueError, match="positive int"):
        RowSketch(4, rows=0)


def test_no_sketch_while_the_exact_grams_fit() -> None:
    widths, consumers = {0: 4096, 1: 2048, 2: 64}, {0: 1, 1: 2, 2: 1}
    exact = 8 * (4096**2 + 2 * 2048**2 + 64**2)
    assert plan_sketches(widths, consumers, exact) == {}
    # one byte short: the widest group goes first, at half its width
    assert plan_sketches(widths, consumers, exact - 1) == {0: 2048}
    # then the next one
    assert plan_sketches(widths, consumers, 8 * (4096 * 2048 + 2 * 2048**2)) == {0: 2048, 1: 1024}


def test_a_tight_budget_shrinks_every_sketch_by_one_factor() -> None:
    widths, consumers = {0: 4096, 1: 2048, 2: 64}, {0: 1, 1: 1, 2: 1}
    budget = 8 * 64**2 + 8 * (1024 * 4096 + 512 * 2048)  # a quarter of each width
    plan = plan_sketches(widths, consumers, budget)
    assert plan == {0: 1024, 1: 512}
    used = 8 * 64**2 + sum(8 * k * widths[g] for g, k in plan.items())
    assert used <= budget


def test_a_budget_too_small_names_the_widest_group() -> None:
    with pytest.raises(ValueError, match=r"'fc1' \(4096 units\).*raise stats_memory"):
        plan_sketches({0: 4096, 1: 32}, {0: 1, 1: 1}, 1 << 20, names={0: "fc1", 1: "fc2"})
    # narrow groups are never sketched: there is nothing to shrink
    with pytest.raises(ValueError, match="'g'"):
        plan_sketches({0: SKETCH_FROM - 1}, {0: 1}, 1000, names={0: "g"})


@settings(max_examples=60, deadline=None)
@given(
    widths=st.lists(st.integers(1, 6000), min_size=1, max_size=6),
    share=st.floats(0.01, 1.5),
)
def test_a_plan_fits_its_budget_or_is_refused(widths: list[int], share: float) -> None:
    ws = dict(enumerate(widths))
    cons = {g: 1 + g % 2 for g in ws}
    budget = max(1, int(share * sum(8 * m * m * cons[g] for g, m in ws.items())))
    try:
        plan = plan_sketches(ws, cons, budget)
    except ValueError:
        return
    used = sum(8 * (plan.get(g, m)) * m * cons[g] for g, m in ws.items())
    assert used <= budget
    for g, k in plan.items():
        assert ws[g] >= SKETCH_FROM and max(MIN_SKETCH_ROWS, ws[g] // 8) <= k < ws[g]


def test_memory_sizes_parse_and_bad_ones_are_refused() -> None:
    assert parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("1.5g") == 3 << 29
    assert parse_bytes("8GB") == 8 << 30
    assert parse_bytes(4096) == 4096
    for bad in ("lots", "-1GiB", 0, True, "0"):
        with pytest.raises(ValueError):
            parse_bytes(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="memory size"):
        CompressConfig(stats_memory="a lot")
    cfg = CompressConfig(stats_memory="2GiB")
    assert CompressConfig.from_dict(cfg.to_dict()) == cfg
    assert default_stats_memory("cpu") > 1 << 20
