"""Fixtures for the zoo tests: point SPECTRIM_DATA at the shared offline data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DEFAULT_DATA = "/work/shared/data"


@pytest.fixture
def data_dir(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The offline data root (``$SPECTRIM_DATA`` or the shared default), set for the test."""
    root = os.environ.get("SPECTRIM_DATA") or DEFAULT_DATA
    if not Path(root).is_dir():
        pytest.skip(f"offline data not found at {root} (set SPECTRIM_DATA)")
    monkeypatch.setenv("SPECTRIM_DATA", root)
    return Path(root)
