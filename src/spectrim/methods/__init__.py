"""Compression methods, registered by name (``spectrim.methods.available()``)."""

from spectrim.methods import interpolative, magnitude, spectral  # noqa: F401  (registration)
from spectrim.methods.base import (
    GroupSolver,
    Method,
    OrderSolver,
    available,
    get_method,
    register_method,
)

__all__ = ["GroupSolver", "Method", "OrderSolver", "available", "get_method", "register_method"]
