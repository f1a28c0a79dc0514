"""Stage 2, compile: routing-graph IR and passes -> a versioned plan (precision per unit, layout, prefetch)."""

from exq.compiler.artifact import Artifact
from exq.compiler.compile import compile_plan
from exq.compiler.costs import FrequencyProxy, SensitivityTable
from exq.compiler.ir import RoutingGraph

__all__ = ["Artifact", "FrequencyProxy", "RoutingGraph", "SensitivityTable", "compile_plan"]
