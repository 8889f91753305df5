"""GramAccumulator (streamed XᵀX / XᵀY) and rows_from_activation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrim.calibration import GramAccumulator, rows_from_activation
from spectrim.linalg import id_factorize


def _rel_fro(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _split(n: int, rng: np.random.Generator) -> list[int]:
    """Random batch boundaries (including empty batches)."""
    cuts = np.sort(rng.integers(0, n + 1, size=int(rng.integers(0, 8))))
    return [0, *cuts.tolist(), n]


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 8192])
def test_streamed_float32_matches_float64_reference(chunk_rows: int) -> None:
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    n, d, c = (210 if chunk_rows < 10 else 3000), 24, 5
    x = torch.relu(torch.randn(n, d, generator=gen)) * torch.rand(d, generator=gen) * 10
    y = torch.randn(n, c, generator=gen)
    acc = GramAccumulator(d, cross_dim=c, chunk_rows=chunk_rows)
    bounds = _split(n, rng)
    for a, b in itertools.pairwise(bounds):
        acc.update(x[a:b], y[a:b])
    ref = x.double().T @ x.double()
    assert acc.gram.dtype == torch.float64
    assert acc.count == n
    assert _rel_fro(acc.gram, ref) < 1e-6
    assert _rel_fro(acc.cross, x.double().T @ y.double()) < 1e-6
    torch.testing.assert_close(acc.sums, x.double().sum(0), rtol=1e-6, atol=1e-6)  # f32 chunks
    torch.testing.assert_close(acc.mean, x.double().mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(acc.y_mean, y.double().mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(acc.second_moment, acc.gram / n)
    assert torch.equal(acc.gram, acc.gram.T)


def test_exact_mode_matches_to_1e12() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5000, 16, generator=gen, dtype=torch.float64) * 3
    y = torch.randn(5000, 3, generator=gen, dtype=torch.float64)
    acc = GramAccumulator(16, cross_dim=3, chunk_rows=333, exact=True)
    for part_x, part_y in zip(x.split(777), y.split(777)):
        acc.update(part_x, part_y)
    assert _rel_fro(acc.gram, x.T @ x) < 1e-12
    assert _rel_fro(acc.cross, x.T @ y) < 1e-12


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 300),
    st.integers(1, 12),
    st.integers(5, 100),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)
def test_streaming_invariance(n: int, d: int, chunk_rows: int, seed: int, exact: bool) -> None:
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((n, d)))
    acc = GramAccumulator(d, chunk_rows=chunk_rows, exact=exact)
    bounds = _split(n, rng)
    for a, b in itertools.pairwise(bounds):
        acc.update(x[a:b])
    ref = x.T @ x
    tol = 1e-12 if exact else 1e-6
    assert acc.count == n
    if n:
        assert _rel_fro(acc.gram, ref) < tol
    else:
        assert torch.count_nonzero(acc.gram) == 0


def test_gram_not_accumulating_float32_error() -> None:
    """Error stays at float32-product level even for many rows (float64 accumulation)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(200_000, 4, generator=gen) + 1.0  # all-positive: worst case for sums
    acc = GramAccumulator(4, chunk_rows=4096)
    for part in x.split(10_000):
        acc.update(part)
    ref = x.double().T @ x.double()
    assert _rel_fro(acc.gram, ref) < 1e-6
    # a naive float32 running sum would drift much further
    naive = torch.zeros(4, 4)
    for part in x.split(10_000):
        naive += part.T @ part
    assert _rel_fro(acc.gram, ref) <= _rel_fro(naive.double(), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_input_dtypes(dtype: torch.dtype) -> None:
    x = (torch.randn(100, 6, generator=torch.Generator().manual_seed(3))).to(dtype)
    acc = GramAccumulator(6)
    acc.update(x)
    ref = x.double().T @ x.double()  # exact products of the given (rounded) values
    assert _rel_fro(acc.gram, ref) < 1e-6


def test_non_contiguous_and_requires_grad() -> None:
    base = torch.randn(8, 50, requires_grad=True)
    x = base.T  # non-contiguous (50, 8) view that requires grad
    acc = GramAccumulator(8, exact=True)
    acc.update(x)
    ref = x.detach().double().T @ x.detach().double()
    assert _rel_fro(acc.gram, ref) < 1e-12
    assert not acc.gram.requires_grad


def test_merge_equals_single_pass() -> None:
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(300, 5, generator=gen), torch.randn(300, 2, generator=gen)
    whole = GramAccumulator(5, cross_dim=2, exact=True)
    whole.update(x, y)
    a = GramAccumulator(5, cross_dim=2, exact=True)
    b = GramAccumulator(5, cross_dim=2, exact=True)
    a.update(x[:120], y[:120])
    b.update(x[120:], y[120:])
    assert a.merge(b) is a
    assert a.count == 300
    torch.testing.assert_close(a.gram, whole.gram, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.cross, whole.cross, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.sums, whole.sums, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.y_sums, whole.y_sums, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="other must have dim=5"):
        a.merge(GramAccumulator(4))
    with pytest.raises(ValueError, match="cross_dim=2"):
        a.merge(GramAccumulator(5))
    with pytest.raises(TypeError, match="other must be a GramAccumulator"):
        a.merge(object())  # type: ignore[arg-type]


def test_numpy_helpers_and_reset() -> None:
    acc = GramAccumulator(2, cross_dim=1, exact=True)
    acc.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0], [-1.0]]))
    g = acc.gram_numpy()
    assert isinstance(g, np.ndarray)
    assert g.dtype == np.float64
    np.testing.assert_array_equal(g, [[10.0, 14.0], [14.0, 20.0]])
    np.testing.assert_array_equal(acc.gram_numpy(normalize=True), [[5.0, 7.0], [7.0, 10.0]])
    np.testing.assert_array_equal(acc.cross_numpy(), [[-2.0], [-2.0]])
    np.testing.assert_array_equal(acc.cross_numpy(normalize=True), [[-1.0], [-1.0]])
    np.testing.assert_array_equal(acc.mean_numpy(), [2.0, 3.0])
    # properties return copies: mutating them does not touch the accumulator
    acc.gram.zero_()
    acc.cross.zero_()
    assert acc.gram_numpy()[0, 0] == 10.0
    assert acc.cross_numpy()[0, 0] == -2.0
    assert "count=2" in repr(acc)
    acc.reset()
    assert acc.count == 0
    assert torch.count_nonzero(acc.gram) == 0
    with pytest.raises(ValueError, match="count == 0"):
        _ = acc.mean


def test_validation() -> None:
    acc = GramAccumulator(3)
    with pytest.raises(ValueError, match=r"x must have shape \(n, 3\)"):
        acc.update(torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"x must have shape \(n, 3\)"):
        acc.update(torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match="x must have a floating-point dtype"):
        acc.update(torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        acc.update(np.zeros((4, 3)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="y was given"):
        acc.update(torch.zeros(4, 3), torch.zeros(4, 1))
    bad = torch.ones(4, 3)
    bad[2, 1] = float("nan")
    acc.update(torch.ones(2, 3))
    with pytest.raises(ValueError, match="x contains non-finite"):
        acc.update(bad)
    assert acc.count == 2  # rejected batch left no trace
    assert float(acc.gram[0, 0]) == 2.0
    with pytest.raises(ValueError, match="cross term"):
        _ = acc.cross

    accy = GramAccumulator(3, cross_dim=2)
    with pytest.raises(ValueError, match="y is required"):
        accy.update(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="same number of rows"):
        accy.update(torch.zeros(4, 3), torch.zeros(5, 2))
    with pytest.raises(ValueError, match=r"y must have shape \(n, 2\)"):
        accy.update(torch.zeros(4, 3), torch.zeros(4, 3))

    for kwargs in ({"dim": 0}, {"dim": 2, "cross_dim": 0}, {"dim": 2, "chunk_rows": 0}):
        with pytest.raises(ValueError):
            GramAccumulator(**kwargs)  # type: ignore[arg-type]


def test_feeds_id_factorize() -> None:
    """Streamed Gram of conv activations gives the pivots of CPQR on the flattened rows."""
    gen = torch.Generator().manual_seed(5)
    acts = [torch.relu(torch.randn(4, 10, 6, 6, generator=gen) + 0.3) for _ in range(3)]
    acc = GramAccumulator(10, chunk_rows=50)
    for a in acts:
        acc.update(rows_from_activation(a, channel_dim=1))
    Z = torch.cat([rows_from_activation(a, 1) for a in acts]).double().numpy()
    fac = id_factorize(acc.gram_numpy())
    _, pz = scipy.linalg.qr(Z, mode="r", pivoting=True)
    np.testing.assert_array_equal(fac.perm, pz)


# --------------------------------------------------------------------------- rows_from_activation


def test_rows_conv_layout() -> None:
    t = torch.randn(2, 3, 4, 5)
    rows = rows_from_activation(t, channel_dim=1)
    assert rows.shape == (2 * 4 * 5, 3)
    torch.testing.assert_close(rows, t.permute(0, 2, 3, 1).reshape(-1, 3), rtol=0, atol=0)
    # the ID repo's transformZconv: (N,C,H,W) -> (C, N·H·W) -> transpose
    ref = t.permute(1, 0, 2, 3).reshape(3, -1).T
    torch.testing.assert_close(rows, ref, rtol=0, atol=0)
    # row index n·H·W + h·W + w
    assert torch.equal(rows[1 * 20 + 2 * 5 + 3], t[1, :, 2, 3])
    assert torch.equal(rows_from_activation(t, channel_dim=-3), rows)


def test_rows_transformer_and_fc() -> None:
    t = torch.randn(3, 7, 16)
    rows = rows_from_activation(t, channel_dim=-1)
    assert rows.shape == (21, 16)
    torch.testing.assert_close(rows, t.reshape(21, 16), rtol=0, atol=0)
    x = torch.randn(5, 4)
    assert torch.equal(rows_from_activation(x, 1), x)
    assert torch.equal(rows_from_activation(x, -1), x)
    assert torch.equal(rows_from_activation(x, 0), x.T)
    v = torch.randn(6)
    assert rows_from_activation(v, 0).shape == (1, 6)


@pytest.mark.parametrize("channel_dim", [0, 1, 2, 3, 4, -1, -2, -5])
def test_rows_any_channel_dim(channel_dim: int) -> None:
    t = torch.randn(2, 3, 4, 5, 6)
    rows = rows_from_activation(t, channel_dim)
    a = t.numpy()
    ref = np.moveaxis(a, channel_dim, -1).reshape(-1, a.shape[channel_dim])
    np.testing.assert_array_equal(rows.numpy(), ref)
    assert rows.dtype == t.dtype


def test_rows_edge_cases() -> None:
    assert rows_from_activation(torch.zeros(0, 3, 2, 2), 1).shape == (0, 3)
    assert rows_from_activation(torch.zeros(2, 0, 2, 2), 1).shape == (8, 0)
    with pytest.raises(ValueError, match="channel_dim must be in"):
        rows_from_activation(torch.zeros(2, 3), 2)
    with pytest.raises(ValueError, match="channel_dim must be in"):
        rows_from_activation(torch.zeros(2, 3), -3)
    with pytest.raises(ValueError, match="at least one dimension"):
        rows_from_activation(torch.tensor(1.0), 0)
    with pytest.raises(TypeError, match=r"t must be a torch\.Tensor"):
        rows_from_activation(np.zeros((2, 3)), 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="channel_dim must be an int"):
        rows_from_activation(torch.zeros(2, 3), 1.0)  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device() -> None:
    x = torch.randn(1000, 8, device="cuda")
    acc = GramAccumulator(8, device="cuda")
    acc.update(x)
    acc_cpu = GramAccumulator(8, device="cpu")  # CPU accumulator fed with CUDA rows
    acc_cpu.update(x)
    follows = GramAccumulator(8)  # no device: the rows'
    follows.update(x)
    ref = x.double().T @ x.double()
    assert acc.gram.device.type == "cuda" and follows.gram.device.type == "cuda"
    assert acc_cpu.gram.device.type == "cpu"
    assert _rel_fro(acc.gram, ref) < 1e-6
    assert _rel_fro(acc_cpu.gram.cuda(), ref) < 1e-6


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 5),
    c=st.integers(1, 9),
    spatial=st.sampled_from([(), (1,), (3,), (2, 5), (4, 4)]),
    cross=st.integers(0, 4),
    exact=st.booleans(),
)
def test_update_activation_equals_rows(
    n: int, c: int, spatial: tuple[int, ...], cross: int, exact: bool
) -> None:
    """The batched (no-copy) path gives the same statistics as flattening to rows,
    whichever of the two paths the shape takes (spatial size below the channel count
    falls back to rows)."""
    gen = torch.Generator().manual_seed(n * 100 + c)
    x = torch.randn(n, c, *spatial, generator=gen)
    y = torch.randn(n, cross, *spatial, generator=gen) if cross else None
    a = GramAccumulator(c, cross_dim=cross or None, exact=exact)
    b = GramAccumulator(c, cross_dim=cross or None, exact=True)
    a.update_activation(x, 1, y)
    b.update(rows_from_activation(x, 1), None if y is None else rows_from_activation(y, 1))
    assert a.count == b.count
    torch.testing.assert_close(a.gram, b.gram, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.sums, b.sums, rtol=1e-5, atol=1e-5)
    if y is not None:
        torch.testing.assert_close(a.cross, b.cross, rtol=1e-5, atol=1e-5)
        ref_sq = (rows_from_activation(y, 1).double() ** 2).sum(0)
        torch.testing.assert_close(a.y_sq_sums, ref_sq, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", [1, 3 * 8 * 16 * 7, 1 << 30])
def test_exact_update_activation_in_example_chunks(
    budget: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exact mode converts a few examples at a time; any chunking gives the float64 sums."""
    import spectrim.calibration.gram as gram_module

    monkeypatch.setattr(gram_module, "_EXACT_CHUNK_BYTES", budget)  # 1 example, 7, all
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(13, 5, 4, 4, generator=gen), torch.randn(13, 2, 4, 4, generator=gen)
    acc = GramAccumulator(5, cross_dim=2, exact=True)
    acc.update_activation(x, 1, y)
    rx, ry = rows_from_activation(x, 1).double(), rows_from_activation(y, 1).double()
    assert acc.count == 13 * 16
    torch.testing.assert_close(acc.gram, rx.T @ rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.cross, rx.T @ ry, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.sums, rx.sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.y_sq_sums, (ry * ry).sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("exact", [False, True])
def test_non_finite_y_is_refused_whatever_vouches_for_it(exact: bool) -> None:
    """A NaN or inf in ``y`` (rows or an activation), or finite ``y`` whose float32 cross
    products overflow, is refused and leaves no trace; huge finite products that fit are
    accepted (the check reads ``y``'s column norms first, the products only when those
    cannot rule out an overflow)."""
    acc = GramAccumulator(3, cross_dim=2, exact=exact)
    acc.update(torch.ones(4, 3), torch.ones(4, 2))
    for value in (float("nan"), float("inf")):
        y = torch.ones(4, 2)
        y[1, 0] = value
        with pytest.raises(ValueError, match="y contains non-finite"):
            acc.update(torch.ones(4, 3), y)
        with pytest.raises(ValueError, match="y contains non-finite"):
            acc.update_activation(torch.ones(1, 3, 2, 2), 1, y.T.reshape(1, 2, 2, 2))
    big = torch.full((4, 2), 3e19)  # ‖y‖² overflows float32, x·y does not
    acc.update(torch.ones(4, 3), big)
    assert acc.count == 8 and float(acc.cross[0, 0]) == pytest.approx(4 + 4 * 3e19)
    if not exact:  # x·y = 4·1e18·1e20 overflows float32
        with pytest.raises(ValueError, match="y contains non-finite"):
            acc.update(torch.full((4, 3), 1e18), torch.full((4, 2), 1e20))
        assert acc.count == 8


def test_update_activation_channels_last_and_errors() -> None:
    x = torch.randn(2, 7, 5)  # (batch, tokens, features): channel axis last
    acc = GramAccumulator(5)
    acc.update_activation(x, -1)
    rows = x.reshape(-1, 5).double()
    torch.testing.assert_close(acc.gram, rows.T @ rows, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="y must be given"):
        GramAccumulator(3, cross_dim=2).update_activation(torch.randn(2, 3, 4, 4), 1)
    with pytest.raises(ValueError, match="y must have shape"):
        GramAccumulator(3, cross_dim=2).update_activation(
            torch.randn(2, 3, 4, 4), 1, torch.randn(2, 2, 4, 5)
        )
    with pytest.raises(ValueError, match="non-finite"):
        GramAccumulator(3).update_activation(torch.full((2, 3, 4, 4), float("nan")), 1)


def test_without_sums_same_products_and_clear_errors() -> None:
    """``sums=False`` skips the column sums (one pass less) and changes nothing else."""
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 4, 5, 5, generator=gen), torch.randn(6, 3, 5, 5, generator=gen)
    a = GramAccumulator(4, cross_dim=3)
    b = GramAccumulator(4, cross_dim=3, sums=False)
    a.update_activation(x, 1, y)
    b.update_activation(x, 1, y)
    b.update(rows_from_activation(x, 1), rows_from_activation(y, 1))
    a.update(rows_from_activation(x, 1), rows_from_activation(y, 1))
    torch.testing.assert_close(a.gram, b.gram, rtol=0, atol=0)
    torch.testing.assert_close(a.cross, b.cross, rtol=0, atol=0)
    torch.testing.assert_close(a.y_sq_sums, b.y_sq_sums, rtol=0, atol=0)
    assert a.count == b.count
    for attr in ("sums", "mean", "y_sums", "y_mean"):
        with pytest.raises(ValueError, match="sums=False"):
            getattr(b, attr)
    with pytest.raises(ValueError, match="sums"):
        a.merge(b)


def test_products_added_to_a_second_accumulator_equal_a_second_update() -> None:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 5, 4, 4, generator=gen)
    a, b, c = GramAccumulator(5), GramAccumulator(5), GramAccumulator(5)
    p = a.update_activation(x, 1)
    b.add(p)
    c.update_activation(x, 1)
    assert b.count == c.count == a.count == 48
    torch.testing.assert_close(b.gram, c.gram, rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not fit"):
        GramAccumulator(4).add(p)
    with pytest.raises(ValueError, match="column sums"):
        GramAccumulator(5, sums=False).add(p)


@pytest.mark.parametrize("cross", [0, 3])
def test_channels_last_activation_is_read_as_rows(cross: int) -> None:
    """A ``channels_last`` activation is already a row matrix: same statistics as the
    channel-first tensor, and no copy of the activation is needed for it."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 6, 8, 8, generator=gen)
    y = torch.randn(4, cross, 8, 8, generator=gen) if cross else None
    cl = torch.channels_last
    a = GramAccumulator(6, cross_dim=cross or None, exact=True)
    b = GramAccumulator(6, cross_dim=cross or None, exact=True)
    a.update_activation(x, 1, y)
    b.update_activation(
        x.contiguous(memory_format=cl), 1, None if y is None else y.contiguous(memory_format=cl)
    )
    torch.testing.assert_close(a.gram, b.gram, rtol=1e-12, atol=1e-12)
    if y is not None:
        torch.testing.assert_close(a.cross, b.cross, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.y_sq_sums, b.y_sq_sums, rtol=1e-12, atol=1e-12)
    x_cl = x.contiguous(memory_format=cl)
    rows = rows_from_activation(x_cl, 1)
    assert rows.data_ptr() == x_cl.data_ptr()  # a view: no copy of the activation


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("scratch", [1, 700, 5000, 10**9])
def test_bounded_scratch_gives_the_same_statistics(exact: bool, scratch: int) -> None:
    """Products split over examples, or tiled by columns when one example's product is
    over the bound (a wide layer), add up to the same Gram, cross term and sums."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 12, 7, generator=g), torch.randn(5, 9, 7, generator=g)
    rows = torch.randn(300, 12, generator=g)
    ref = GramAccumulator(12, cross_dim=9, exact=True)
    ref.update_activation(x, 1, y)
    ref.update(rows, rows[:, :9])
    acc = GramAccumulator(12, cross_dim=9, exact=exact, scratch_bytes=scratch, chunk_rows=64)
    acc.update_activation(x, 1, y)
    acc.update(rows, rows[:, :9])
    tol = 1e-12 if exact else 1e-6
    assert acc.count == ref.count == 5 * 7 + 300
    for a, b in ((acc.gram, ref.gram), (acc.cross, ref.cross), (acc.sums, ref.sums),
                 (acc.y_sums, ref.y_sums), (acc.y_sq_sums, ref.y_sq_sums)):  # fmt: skip
        assert _rel_fro(a, b) < tol
