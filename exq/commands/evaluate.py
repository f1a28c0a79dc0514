"""`exq eval`."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from exq.commands.common import positive_int


def add(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser(
        "eval",
        help="perplexity, KL vs bf16, top-1 agreement and recovery of quantized variants, with plots",
        description="Evaluate exq checkpoints (--quantized) and/or plans (--artifact, fake-quantized in memory) "
        "against the bf16 model on held-out text; uniform int4 RTN is always evaluated (recovery is measured "
        "against it), --compare adds uniform int4 GPTQ, int3 RTN and int3-asym GPTQ.",
    )
    p.add_argument("--model", required=True, help="the bf16 model")
    p.add_argument("--quantized", nargs="*", default=[], metavar="DIR", help="exq checkpoints of the same model")
    p.add_argument("--artifact", nargs="*", default=[], metavar="PLAN", help="compiled plans, fake-quantized")
    p.add_argument("--corpus", nargs="+", required=True, metavar="FILE", help="held-out text (test splits)")
    p.add_argument("--tokens", type=positive_int, default=65536, help="total tokens, split over the files")
    p.add_argument(
        "--compare",
        action="store_true",
        help="also run the uniform baselines (GPTQ ones need calibration text: --calib-corpus, or a plan's)",
    )
    p.add_argument("--calib-corpus", nargs="+", metavar="FILE", help="calibration text for GPTQ baselines")
    p.add_argument("--seq-len", type=positive_int, help="tokens per sequence (default 256, or the model's context)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--output", required=True, help="report folder")

    def run(a: argparse.Namespace) -> int:
        from exq.compiler import Artifact
        from exq.data.corpus import load_domains
        from exq.errors import ExqError
        from exq.eval import evaluate
        from exq.eval.report import write_report
        from exq.models import load_model, load_tokenizer
        from exq.models.loading import context_len
        from exq.pipeline import Calibration, calibration_stats

        if not (a.quantized or a.artifact or a.compare):
            raise ExqError("nothing to evaluate", "give --quantized DIR, --artifact PLAN or --compare")
        model = load_model(a.model, device=a.device)
        tok = load_tokenizer(a.model)
        domains = load_domains(a.corpus, tok, a.tokens)

        def stats_for():
            if a.calib_corpus:
                cal = Calibration.of(a.calib_corpus, 32768, 0, model)
            else:
                plans = [Artifact.load(x) for x in a.artifact] + [
                    Artifact.load(Path(q) / "exq-plan.json") for q in a.quantized
                ]
                rec = next(
                    (
                        pl.cost_source.get("method", {}).get("calibration")
                        for pl in plans
                        if pl.cost_source.get("method", {}).get("calibration")
                    ),
                    None,
                )
                if rec is None:
                    return None
                base = Path(a.artifact[0]).parent if a.artifact else Path(a.quantized[0])
                cal = Calibration.from_dict(rec, base)
            calib, _ = cal.domains(tok)
            return calibration_stats(model, calib, cal.seq_len, progress=True)

        report, variants = evaluate(
            model,
            domains,
            quantized=a.quantized,
            artifacts=a.artifact,
            compare=a.compare,
            stats_for=stats_for,
            seq_len=context_len(model, a.seq_len, 256),
            batch_size=a.batch_size,
        )
        command = "exq " + " ".join(shlex.quote(x) for x in sys.argv[1:])
        title = f"{Path(a.model).name}: {sum(d.tokens.numel() for d in domains):,} held-out tokens"
        written = write_report(report, variants, a.output, title, command)
        print(Path(written[1]).read_text())
        print("wrote " + ", ".join(str(w) for w in written))
        return 0

    return run
