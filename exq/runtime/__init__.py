"""exq's runtime: modules that compute with experts stored in exq formats, and the checkpoint loader."""

from exq.runtime.experts import QuantizedExperts, QuantizedLinear
from exq.runtime.load import load

__all__ = ["QuantizedExperts", "QuantizedLinear", "load"]
