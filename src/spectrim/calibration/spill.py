"""Block boundaries held on disk between blocks (``CompressConfig.block_cache``).

The block-by-block pass (:mod:`spectrim.calibration.blocks`) hands every fitted batch's
output of one block to the next, twice: the original block's and the compressed one's.
Held in memory, those are two (briefly four) copies of the activations at a block
boundary for the whole fitted set, which for long text or many images outweighs the
block's own statistics.  A :class:`Spill` with a folder writes each boundary tensor to
its own file as it is produced and reads it back when the next block needs it, so the
pass holds one batch's boundary at a time.

The files are the pass's own: written atomically (a rename, without the fsync of
:func:`spectrim._files.atomic_write_bytes`: a scratch file dies with the pass) into a
fresh private folder (``tempfile.mkdtemp``, mode 0700) under the one given, read back
with ``torch.load(weights_only=True)`` (no code runs), checked against the shape, dtype
and strides recorded when written, and deleted when the pass no longer needs them (the
folder with :meth:`Spill.close`).  Anything that is not a tensor (a dict batch, a model output)
stays in memory.

Example::

    >>> import tempfile, torch
    >>> with tempfile.TemporaryDirectory() as d, Spill(d) as spill:
    ...     h = spill.put(torch.arange(6.0).reshape(2, 3))
    ...     x = spill.get(h)
    ...     n = len(spill)
    >>> x.tolist(), n
    ([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], 1)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["Spill", "Spilled"]


class Spilled:
    """A tensor written by :meth:`Spill.put`: its file and what it must read back as."""

    __slots__ = ("device", "dtype", "path", "shape", "stride")

    def __init__(self, path: Path, x: torch.Tensor) -> None:
        self.path = path
        self.shape = tuple(x.shape)
        self.dtype = x.dtype
        self.stride = tuple(x.stride())
        self.device = x.device

    def __repr__(self) -> str:
        return f"Spilled({self.path.name}, {self.shape}, {self.dtype})"


def _dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when it owns its whole storage, else a copy that does (``torch.save``
    writes a view's whole storage)."""
    whole = x.untyped_storage().nbytes() == x.numel() * x.element_size()
    return x if whole and x.storage_offset() == 0 else x.clone()


class Spill:
    """Where the block pass keeps each batch's boundary activations.

    ``Spill(None)`` keeps them in memory (:meth:`put` returns its argument);
    ``Spill(folder)`` writes each tensor to a file in a private folder under ``folder``
    and returns a :class:`Spilled` handle that :meth:`get` reads back.
    """

    def __init__(self, folder: str | os.PathLike[str] | None) -> None:
        self.root: Path | None = None
        self._live: dict[Path, Spilled] = {}
        self._count = 0
        if folder is not None:
            base = Path(folder)
            try:
                base.mkdir(parents=True, exist_ok=True)
                self.root = Path(tempfile.mkdtemp(prefix="spectrim-blocks-", dir=base))
            except OSError as e:
                raise OSError(
                    f"block_cache={str(folder)!r}: cannot create the block pass's folder there "
                    f"({e.strerror or e})"
                ) from e

    @property
    def on_disk(self) -> bool:
        """Whether tensors go to files."""
        return self.root is not None

    def __len__(self) -> int:
        """How many files are live."""
        return len(self._live)

    def put(self, x: Any) -> Any:
        """``x`` in memory, or the handle of the file it was written to (tensors only)."""
        if self.root is None or not isinstance(x, torch.Tensor):
            return x
        x = _dense(x.detach())
        self._count += 1
        path = self.root / f"{self._count:08d}.pt"
        tmp = path.with_suffix(".tmp")
        try:
            torch.save(x, tmp)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OSError(
                f"block_cache: cannot write a block boundary to {path} ({e.strerror or e}); "
                "free some space there or pass another folder"
            ) from e
        handle = Spilled(path, x)
        self._live[path] = handle
        return handle

    def get(self, h: Any) -> Any:
        """What :meth:`put` was given, read back from its file when it was written."""
        if not isinstance(h, Spilled):
            return h
        if h.path not in self._live:
            raise RuntimeError(f"block_cache: {h.path} was read after it was released")
        x = torch.load(h.path, map_location=h.device, weights_only=True)
        if (
            not isinstance(x, torch.Tensor)
            or tuple(x.shape) != h.shape
            or x.dtype != h.dtype
            or tuple(x.stride()) != h.stride
        ):
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x)
            raise RuntimeError(
                f"block_cache: {h.path} holds {got}, not the {h.shape} {h.dtype} tensor "
                "written there: the file changed during the pass"
            )
        return x

    def release(self, old: Iterable[Any], keep: Iterable[Any] = ()) -> None:
        """Delete the files of the handles in ``old`` that are not in ``keep``."""
        kept = {id(h) for h in keep}
        for h in old:
            if isinstance(h, Spilled) and id(h) not in kept and h.path in self._live:
                del self._live[h.path]
                h.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Delete every file and the pass's folder."""
        self._live.clear()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
