"""Running compressed models: execution paths that exploit what compression produced."""

from spectrim.runtime.sparse import SparseLinear, to_sparse_execution

__all__ = ["SparseLinear", "to_sparse_execution"]
