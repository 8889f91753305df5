"""Thread hygiene for code that interleaves NumPy/SciPy linear algebra with torch.

OpenBLAS worker threads busy-wait for a while after every call.  When a small LAPACK
solve is followed by torch convolutions (the sequential fits fold each correction just
before its consumer runs), the spinning workers hold the cores that torch's own threads
need: on 2 cores the ResNet-56 sequential pass took 1.0 s instead of 0.57 s.  Small
factorisations gain nothing from several BLAS threads, so spectrim runs them on one.

Example (a context manager, or a decorator as on :func:`spectrim.compress`)::

    >>> import numpy as np
    >>> with single_threaded_blas():
    ...     float(np.linalg.norm(np.eye(3)))
    1.7320508075688772
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from threadpoolctl import threadpool_limits

__all__ = ["WIDE", "blas_threads_for", "single_threaded_blas"]

#: factorisations at least this wide run BLAS on all of torch's threads: a pivoted QR of a
#: 4096-wide Gram takes 9.3 s on one thread and 1.8 s on 16, ``eigh`` 10.0 s and 2.9 s
#: (benchmarks/scale.py, part ``factor``); below it the spinning workers cost more
WIDE = 1024


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """NumPy/SciPy BLAS (not torch's) on one thread inside the block, restored after."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@contextmanager
def blas_threads_for(width: int) -> Iterator[None]:
    """Inside :func:`single_threaded_blas`: BLAS on ``torch.get_num_threads()`` threads
    for a block whose factorisations are at least :data:`WIDE` wide, else unchanged.

    Example::

        >>> with single_threaded_blas(), blas_threads_for(8):
        ...     pass
    """
    if width < WIDE:
        yield
        return
    with threadpool_limits(limits=max(torch.get_num_threads(), 1), user_api="blas"):
        yield
