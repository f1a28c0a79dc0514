"""Profiling overhead: `exq profile`'s forward pass with router taps vs a plain forward over the same batches.

    python benchmarks/profile_overhead.py --model PATH --corpus FILE [FILE ...] [--tokens 20000] [--repeats 5]

Three timings over identical batches, interleaved and repeated, medians reported:
  plain_lm       model(input_ids)          what a user's plain forward costs (includes the LM head)
  plain_decoder  model.model(input_ids)    the same decoder stack exq runs (no LM head)
  profiled       exq.profiling.profile_domains: decoder + router hooks + on-device statistics
overhead_vs_decoder isolates the cost of the taps; overhead_vs_lm is the end-to-end comparison. On a CPU (synchronous)
one more profiled run times the taps themselves (tap_share: seconds inside the hooks / the run's seconds), a figure
free of the run-to-run noise that the differences of medians carry.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from exq.data.corpus import load_domains, split_tokens
from exq.models import load_model, load_tokenizer
from exq.profiling import profile_domains
from exq.profiling.profiler import _RouterTap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus", nargs="+", required=True)
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--output", type=Path, help="write the results as JSON here")
    a = ap.parse_args()

    model = load_model(a.model, device=a.device)
    domains = load_domains(a.corpus, load_tokenizer(a.model), a.tokens)
    dev = next(model.parameters()).device
    batches = [b.to(dev) for d in domains for b in split_tokens(d.tokens, a.seq_len, a.batch_size)]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def plain(fn) -> float:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                fn(input_ids=b, use_cache=False)
        sync()
        return time.perf_counter() - t

    def profiled() -> float:
        sync()
        t = time.perf_counter()
        profile_domains(model, domains, seq_len=a.seq_len, batch_size=a.batch_size, progress=False)
        sync()
        return time.perf_counter() - t

    runs = {"plain_lm": lambda: plain(model), "plain_decoder": lambda: plain(model.model), "profiled": profiled}
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(a.repeats):
        for k, fn in runs.items():
            times[k].append(fn())
    med = {k: statistics.median(v) for k, v in times.items()}
    tap_share = None
    if dev.type == "cpu":
        inside = [0.0]
        observe = _RouterTap.observe

        def timed(self, *args):
            t = time.perf_counter()
            observe(self, *args)
            inside[0] += time.perf_counter() - t

        _RouterTap.observe = timed
        try:
            total = profiled()
        finally:
            _RouterTap.observe = observe
        tap_share = round(inside[0] / total, 4)
    res = {
        "model": str(Path(a.model).name),
        "tokens": sum(d.tokens.numel() for d in domains),
        "seq_len": a.seq_len,
        "batch_size": a.batch_size,
        "device": str(dev),
        "dtype": str(model.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "repeats": a.repeats,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "min_s": {k: round(min(v), 4) for k, v in times.items()},
        "all_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "overhead_vs_decoder": round(med["profiled"] / med["plain_decoder"] - 1, 4),
        "overhead_vs_lm": round(med["profiled"] / med["plain_lm"] - 1, 4),
        "overhead_vs_decoder_min": round(min(times["profiled"]) / min(times["plain_decoder"]) - 1, 4),
        "tap_share": tap_share,
    }
    print(json.dumps(res, indent=1))
    if a.output:
        a.output.parent.mkdir(parents=True, exist_ok=True)
        a.output.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
