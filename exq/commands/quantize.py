"""`exq sensitivity` and `exq quantize`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from exq.commands.common import non_negative_int, positive_int

FORMATS_HELP = "candidate formats, comma-separated (default bf16,int8,int4,int4-asym,int3,int3-asym,int2-asym)"


def add_sensitivity(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser(
        "sensitivity",
        help="measure what quantizing each expert block to each format costs (KL, nats per token)",
        description="Calibrate on the profile's text (or --corpus): per-expert Hessians and Fisher statistics from one "
        "forward+backward pass, then, per layer, block and format, quantize and measure the real KL on held-out probe "
        "tokens. Writes the cost table `exq compile --sensitivity` consumes.",
    )
    p.add_argument("--model", required=True)
    p.add_argument("--profile", required=True, help="routing profile of the same model (its text is reused)")
    p.add_argument("--corpus", nargs="+", metavar="FILE", help="calibration text instead of the profile's files")
    p.add_argument("--tokens", type=positive_int, default=32768, help="calibration tokens (default 32768)")
    p.add_argument("--probe-tokens", type=positive_int, default=8192, help="held-out probe tokens (default 8192)")
    p.add_argument("--formats", default=None, help=FORMATS_HELP)
    p.add_argument("--quantizer", choices=["gptq", "clip", "rtn"], default="gptq")
    p.add_argument("--device", default="auto")
    p.add_argument("--output", required=True, help="table path (NAME.json + NAME.npz)")

    def run(a: argparse.Namespace) -> int:
        import numpy as np

        from exq.models import fingerprint, load_model, load_tokenizer, moe_layers
        from exq.pipeline import Calibration, sensitivity
        from exq.profiling import RoutingProfile

        model = load_model(a.model, device=a.device)
        prof = RoutingProfile.load(a.profile, model=fingerprint(model, moe_layers(model)))
        if a.corpus:
            files = a.corpus
        else:
            from exq.data.corpus import resolve_recorded

            files = [resolve_recorded(d.file, d.sha256, Path(a.profile).parent) for d in prof.domains]
        cal = Calibration.of(files, a.tokens, a.probe_tokens, model)
        table, report, _ = sensitivity(model, load_tokenizer(a.model), cal, a.formats, a.quantizer)
        path = table.save(a.output)
        print(f"calibration {report.seconds.get('calibration')} s, probes {report.seconds.get('probes')} s")
        print(f"{'layer':>5} {'block':>7} " + " ".join(f"{f:>10}" for f in table.formats))
        for li in range(table.routed.shape[0]):
            for bi, b in enumerate(("gate_up", "down")):
                row = [table.routed[li, :, bi, fi] for fi in range(len(table.formats))]
                print(f"{li:>5} {b:>7} " + " ".join(f"{float(np.nansum(r)):>10.2e}" for r in row))
        print(f"wrote {path} (KL per token when the whole layer-block takes the format)")
        return 0

    return run


def add_quantize(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser(
        "quantize",
        help="apply a compiled plan: write a packed exq checkpoint",
        description="Quantize every unit in its planned format (GPTQ with the plan's calibration text when it has "
        "one) and write a packed checkpoint folder that `exq.load` and `exq serve` run.",
    )
    p.add_argument("--model", required=True)
    p.add_argument("--artifact", required=True, help="compiled plan (NAME.json)")
    p.add_argument("--output", required=True, help="checkpoint folder")
    p.add_argument("--corpus", nargs="+", metavar="FILE", help="calibration text (default: the plan's)")
    p.add_argument(
        "--quantizer",
        choices=["auto", "gptq", "clip", "rtn"],
        default="auto",
        help="auto: GPTQ when calibration text is known, else clip search",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.add_argument(
        "--tune-steps",
        type=non_negative_int,
        default=0,
        help="end-to-end scale tuning steps after quantizing (0: off; 150 is what docs/quality.md uses)",
    )

    def run(a: argparse.Namespace) -> int:
        from exq.pipeline import quantize_to_checkpoint

        out, size, planned = quantize_to_checkpoint(
            a.model,
            a.artifact,
            a.output,
            corpus=a.corpus,
            quantizer=a.quantizer,
            device=a.device,
            overwrite=a.overwrite,
            tune_steps=a.tune_steps,
        )
        print(f"quantized units: {size:,} bytes on disk for {planned:,} planned ({100 * (size / planned - 1):+.2f} %)")
        print(f"wrote {out}")
        return 0

    return run
