"""Graph analysis and surgery: trace a model, find unit groups, remove channels."""

# attention and stream register the modules they may swap in (spectrim.io rebuilds them)
from spectrim.graph import attention, stream  # noqa: F401
from spectrim.graph.channels import Analysis, ConsumerSlot, UnitGroup, analyze_channels
from spectrim.graph.offload import is_offloaded, onload
from spectrim.graph.surgery import GroupPlan, ModuleSnapshot, apply_plan
from spectrim.graph.trace import Graph, Op, Value, call_model, trace

__all__ = [
    "Analysis",
    "ConsumerSlot",
    "Graph",
    "GroupPlan",
    "ModuleSnapshot",
    "Op",
    "UnitGroup",
    "Value",
    "analyze_channels",
    "apply_plan",
    "call_model",
    "is_offloaded",
    "onload",
    "trace",
]
