"""Compression methods, registered by name (``spectrim.methods.available()``)."""

from spectrim.methods import interpolative, magnitude, spectral, weights  # noqa: F401  (registration)
from spectrim.methods.base import (
    GroupSolver,
    Method,
    OrderSolver,
    available,
    get_method,
    method_kinds,
    method_pair,
    register_method,
    unregister_method,
)
from spectrim.methods.weights import MatrixUnit, WeightMethod

__all__ = [
    "GroupSolver",
    "MatrixUnit",
    "Method",
    "OrderSolver",
    "WeightMethod",
    "available",
    "get_method",
    "method_kinds",
    "method_pair",
    "register_method",
    "unregister_method",
]
