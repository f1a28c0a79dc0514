"""Prefetch hit rate on held-out routing: schedule from the valid split, hits measured on the test split.

    python benchmarks/prefetch_hit_rate.py --model PATH --corpus-dir DIR [--domains austen,shakespeare,kjv,pydocs]
        [--calib-tokens 40000] [--eval-tokens 20000] [--output docs/bench/prefetch_NAME.json]

Profiles DOMAIN.valid.txt.gz (the schedule's only input), traces every token's experts on DOMAIN.test.txt.gz, and
for m = 1, 2, 4 prefetched experts per active expert reports the fraction of layer l+1's chosen experts that were
fetched: exq's schedule (score_j = sum over the active set of P(j | i), top m x k) against the static baseline (the
m x k experts of layer l+1 hottest in calibration). A PNG with the same numbers is written next to the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from exq.compiler.prefetch import build_schedule, hit_rate
from exq.data.corpus import load_domains
from exq.models import load_model, load_tokenizer
from exq.profiling import profile_domains
from exq.profiling.profiler import trace_routing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus-dir", required=True, type=Path)
    ap.add_argument("--domains", default="austen,shakespeare,kjv,pydocs")
    ap.add_argument("--calib-tokens", type=int, default=40_000)
    ap.add_argument("--eval-tokens", type=int, default=20_000)
    ap.add_argument("--output", type=Path)
    a = ap.parse_args()
    model = load_model(a.model, device="cpu")
    tok = load_tokenizer(a.model)
    doms = a.domains.split(",")
    calib = load_domains([a.corpus_dir / f"{d}.valid.txt.gz" for d in doms], tok, a.calib_tokens)
    held = load_domains([a.corpus_dir / f"{d}.test.txt.gz" for d in doms], tok, a.eval_tokens)
    prof = profile_domains(model, calib, progress=False)
    trace = trace_routing(model, held)
    schedule = build_schedule(prof, candidates=max(8, 4 * prof.layers[0].top_k))
    freq = [prof.frequency(i) for i in range(len(prof.layers))]
    res = {
        "model": Path(a.model).name,
        "calib_tokens": prof.tokens,
        "eval_tokens": int(trace[0].shape[0]),
        "num_experts": prof.layers[0].num_experts,
        "top_k": prof.layers[0].top_k,
        "per_active": {},
    }
    for m in (1, 2, 4):
        ours, static = hit_rate(schedule, trace, m, freq)
        res["per_active"][str(m)] = {
            "fetched_per_layer": m * prof.layers[0].top_k,
            "exq_mean": round(float(np.mean(ours)), 4),
            "static_mean": round(float(np.mean(static)), 4),
            "exq_per_transition": [round(x, 4) for x in ours],
            "static_per_transition": [round(x, 4) for x in static],
        }
        print(
            f"m={m}: exq {np.mean(ours):.3f}  static {np.mean(static):.3f}  "
            f"(fetch {m * prof.layers[0].top_k} of {prof.layers[0].num_experts})"
        )
    if a.output:
        a.output.parent.mkdir(parents=True, exist_ok=True)
        a.output.write_text(json.dumps(res, indent=1) + "\n")
        _plot(res, a.output.with_suffix(".png"))


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = list(res["per_active"])
    x = np.arange(len(ms))
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.bar(x - 0.2, [res["per_active"][m]["exq_mean"] for m in ms], 0.4, label="exq schedule (co-activation)")
    ax.bar(x + 0.2, [res["per_active"][m]["static_mean"] for m in ms], 0.4, label="static hottest")
    ax.set_xticks(x, [f"m={m}\n({res['per_active'][m]['fetched_per_layer']} of {res['num_experts']})" for m in ms])
    ax.set_ylabel("hit rate on held-out test split")
    ax.set_ylim(0, 1)
    ax.set_title(f"{res['model']}: prefetch hits, top-{res['top_k']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
