"""Stage 3, quantize: calibration statistics, quantizers, sensitivity tables, plan application, checkpoints."""
