"""Engine plugins: exq checkpoints served by SGLang (and, later, vLLM) through their extension points."""
