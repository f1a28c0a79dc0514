"""Stage 6, eval: perplexity, KL vs bf16, top-1 agreement and recovery of quantized variants, with plots."""

from exq.eval.evaluate import evaluate

__all__ = ["evaluate"]
