"""BLAS thread hygiene: one thread around torch, all of torch's for wide factorisations."""

from __future__ import annotations

import torch
from threadpoolctl import threadpool_info

from spectrim._threads import WIDE, blas_threads_for, single_threaded_blas


def _blas_threads() -> set[int]:
    return {int(p["num_threads"]) for p in threadpool_info() if p["user_api"] == "blas"}


def test_wide_factorisations_get_torchs_threads() -> None:
    if not _blas_threads():
        return  # no BLAS library threadpoolctl can see
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_threaded_blas():
            assert _blas_threads() == {1}
            with blas_threads_for(WIDE - 1):
                assert _blas_threads() == {1}
            with blas_threads_for(WIDE):
                assert _blas_threads() == {2}
            assert _blas_threads() == {1}
    finally:
        torch.set_num_threads(saved)
