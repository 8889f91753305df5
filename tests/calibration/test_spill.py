"""Block boundaries on disk (spectrim.calibration.spill): what goes in comes back, bit for
bit and in its layout; files are private, checked on reading, and deleted."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrim.calibration.spill import Spill, Spilled


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64]),
    seed=st.integers(0, 2**16),
)
def test_a_tensor_comes_back_equal(shape: list[int], dtype: torch.dtype, seed: int) -> None:
    import tempfile

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 100).to(dtype)
    with tempfile.TemporaryDirectory() as d, Spill(d) as spill:
        h = spill.put(x)
        assert isinstance(h, Spilled) and len(spill) == 1
        y = spill.get(h)
        assert y.dtype == x.dtype and torch.equal(y, x)


def test_layout_is_kept_and_a_view_writes_only_its_own_elements(tmp_path: Path) -> None:
    """A channels-last activation reads back channels-last (the next block computes on
    the same layout as in memory); a slice of a big tensor does not write the whole
    storage."""
    x = torch.randn(4, 8, 6, 6).to(memory_format=torch.channels_last)
    big = torch.randn(1000, 64)
    view = big[10:12]
    with Spill(tmp_path) as spill:
        hx, hv = spill.put(x), spill.put(view)
        y = spill.get(hx)
        assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, x)
        assert torch.equal(spill.get(hv), view)
        assert isinstance(hv, Spilled) and hv.path.stat().st_size < 4 * 64 * 4 + 4096
        root = spill.root
        assert root is not None and root.parent == tmp_path
        assert stat.S_IMODE(root.stat().st_mode) == 0o700  # private to this user
    assert not root.exists() and list(tmp_path.iterdir()) == []


def test_memory_mode_and_non_tensors_pass_through(tmp_path: Path) -> None:
    x = torch.ones(3)
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long)}
    with Spill(None) as mem:
        assert not mem.on_disk and mem.put(x) is x and mem.get(x) is x
    with Spill(tmp_path) as disk:
        assert disk.put(batch) is batch and len(disk) == 0  # a dict stays in memory
        assert disk.get(batch) is batch


def test_release_deletes_only_what_is_not_kept(tmp_path: Path) -> None:
    with Spill(tmp_path) as spill:
        a, b = spill.put(torch.zeros(2)), spill.put(torch.ones(2))
        assert isinstance(a, Spilled) and isinstance(b, Spilled)
        spill.release([a, b], keep=[b])
        assert not a.path.exists() and b.path.exists() and len(spill) == 1
        with pytest.raises(RuntimeError, match="read after it was released"):
            spill.get(a)
        assert torch.equal(spill.get(b), torch.ones(2))


def test_a_changed_file_is_refused_by_name(tmp_path: Path) -> None:
    """The file is checked against the shape, dtype and strides written: another tensor
    in its place is an error naming the file, not a silently different model."""
    with Spill(tmp_path) as spill:
        h = spill.put(torch.zeros(2, 3))
        assert isinstance(h, Spilled)
        torch.save(torch.zeros(3, 2), h.path)
        with pytest.raises(RuntimeError, match=rf"{h.path.name}.*changed during the pass"):
            spill.get(h)
        torch.save({"x": torch.zeros(2, 3)}, h.path)
        with pytest.raises(RuntimeError, match="changed during the pass"):
            spill.get(h)


def test_a_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    """Reading back never unpickles arbitrary objects (``weights_only``)."""

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("true",))

    with Spill(tmp_path) as spill:
        h = spill.put(torch.zeros(2))
        assert isinstance(h, Spilled)
        torch.save(Evil(), h.path)
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            spill.get(h)


def test_a_folder_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("a file, not a folder")
    with pytest.raises(OSError, match=r"block_cache=.*taken.*cannot create"):
        Spill(taken)
