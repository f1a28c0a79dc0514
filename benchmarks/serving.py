"""Serving throughput and time to first token at several concurrencies, exq serve vs transformers `generate`.

exq: `exq serve` in its own process (as users run it); C clients in this process each stream their requests back to
back through HTTP until N requests are done; tokens/s = generated tokens / wall time, TTFT =
request sent -> first text chunk. transformers: the same weights (exq.load of the same checkpoint), `generate` on a
left-padded batch of C prompts, greedy, the same prompt and output lengths; TTFT = call -> first sampled token
(timed by a logits processor). Writes JSON + Markdown + a PNG.

    python benchmarks/serving.py --checkpoint runs/demo/q-int4 --concurrency 1 8 32 --output docs/bench/serving_cpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exq.errors import ExqError
from exq.fileio import atomic_write_bytes, atomic_write_json
from exq.models import load_tokenizer
from exq.serve.background import wait_healthy


def p90(values: list[float]) -> float:
    import numpy as np

    return float(np.percentile(values, 90))


def prompts_from(corpus: Path, tokenizer, n: int, length: int) -> list[list[int]]:
    from exq.data.corpus import tokenize_file

    ids = tokenize_file(corpus, tokenizer, None)
    step = max(1, (len(ids) - length) // max(n, 1))
    return [ids[i * step : i * step + length].tolist() for i in range(n)]


async def _client(url: str, model: str, queue: list, max_tokens: int, out: list) -> None:
    async with httpx.AsyncClient(timeout=600) as h:
        while queue:
            prompt = queue.pop()
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
                "stream_options": {"include_usage": True},
            }
            t0, ttft, tokens = time.perf_counter(), None, 0
            async with h.stream("POST", url, json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                        ttft = time.perf_counter() - t0
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            out.append((ttft, tokens, time.perf_counter() - t0))


def bench_server(url: str, model: str, prompts: list[list[int]], conc: int, max_tokens: int) -> dict:
    queue, out = list(reversed(prompts)), []

    async def run():
        await asyncio.gather(*(_client(url, model, queue, max_tokens, out) for _ in range(conc)))

    t0 = time.perf_counter()
    asyncio.run(run())
    wall = time.perf_counter() - t0
    tokens = sum(t for _, t, _ in out)
    return {
        "requests": len(out),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_median_s": statistics.median(t for t, _, _ in out),
        "ttft_p90_s": p90([t for t, _, _ in out]),
    }


def bench_generate(model, prompts: list[list[int]], conc: int, max_tokens: int, pad: int) -> dict:
    """Batches of `conc` prompts through generate, one batch after another (what a batch script does)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class FirstToken(LogitsProcessor):
        def __init__(self) -> None:
            self.at = None

        def __call__(self, input_ids, scores):
            if self.at is None:
                self.at = time.perf_counter()
            return scores

    dev = next(model.parameters()).device
    ttfts, tokens = [], 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), conc):
        batch = prompts[i : i + conc]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=dev)
        first = FirstToken()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=pad,
                logits_processor=LogitsProcessorList([first]),
            )
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ttfts += [first.at - start] * len(batch)
        tokens += (out.shape[1] - width) * len(batch)
    wall = time.perf_counter() - t0
    return {
        "requests": len(prompts),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_median_s": statistics.median(ttfts),
        "ttft_p90_s": p90(ttfts),
    }


def report(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        "| concurrency | exq tok/s | exq TTFT median (ms) | exq TTFT p90 (ms) | generate tok/s | generate TTFT "
        "median (ms) | exq vs generate | exq vs its concurrency 1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = res["runs"][0]["exq"]["tokens_per_s"]
    for r in res["runs"]:
        e, g = r["exq"], r["generate"]
        rows.append(
            f"| {r['concurrency']} | {e['tokens_per_s']:.0f} | {e['ttft_median_s'] * 1e3:.0f} | "
            f"{e['ttft_p90_s'] * 1e3:.0f} | {g['tokens_per_s']:.0f} | {g['ttft_median_s'] * 1e3:.0f} | "
            f"{e['tokens_per_s'] / g['tokens_per_s']:.2f}x | {e['tokens_per_s'] / base:.2f}x |"
        )
    head = (
        f"{res['checkpoint']} on {res['device']} ({res['dtype']}), prompts of {res['prompt_tokens']} tokens, "
        f"{res['max_tokens']} generated tokens each (greedy, ignore_eos), "
        f"max({res['requests']}, 2 x concurrency) requests per point."
    )
    atomic_write_bytes(out.with_suffix(".md"), (head + "\n\n" + "\n".join(rows) + "\n").encode())
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    cs = [r["concurrency"] for r in res["runs"]]
    for key, label in (("exq", "exq serve"), ("generate", "transformers generate")):
        ax[0].plot(cs, [r[key]["tokens_per_s"] for r in res["runs"]], "o-", label=label)
        ax[1].plot(cs, [r[key]["ttft_median_s"] * 1e3 for r in res["runs"]], "o-", label=label)
    for a, t in zip(ax, ("throughput (tokens/s)", "time to first token, median (ms)"), strict=True):
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrent requests")
        a.set_title(t)
        a.legend()
    fig.suptitle(head, fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="an exq checkpoint folder")
    ap.add_argument("--corpus", default="demo/corpus/austen.test.txt.gz", help="prompt text")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level (at least 2x it)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `exq serve` argument (repeatable)")
    ap.add_argument("--label", help="what the report calls the model (default: the checkpoint folder's name)")
    ap.add_argument("--output", required=True, help="path stem: writes STEM.json, STEM.md, STEM.png")
    a = ap.parse_args()
    out = Path(a.output)
    tok = load_tokenizer(a.checkpoint)
    n = max(a.requests, 2 * max(a.concurrency))
    prompts = prompts_from(Path(a.corpus), tok, n, a.prompt_tokens)
    name = Path(a.checkpoint).resolve().name
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "exq",
        "serve",
        "--model",
        a.checkpoint,
        "--port",
        str(port),
        "--device",
        a.device,
        "--max-batch",
        str(max(a.concurrency)),
        "--max-model-len",
        str(a.prompt_tokens + a.max_tokens + 8),
    ]
    cmd += (["--dtype", a.dtype] if a.dtype else []) + a.serve_arg
    server = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, 300, alive=lambda: server.poll() is None)
        except ExqError as e:
            raise SystemExit(f"{e}:\n" + (server.stdout.read() if server.stdout else "")) from e
        card = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
        res = {
            "checkpoint": a.label or name,
            "requests": a.requests,
            "prompt_tokens": a.prompt_tokens,
            "max_tokens": a.max_tokens,
            "torch": torch.__version__,
            "server": " ".join(cmd[1:]),
            "max_model_len": card["max_model_len"],
            "runs": [],
        }
        bench_server(url + "/v1/completions", name, prompts[:4], 2, 8)  # warm-up
        for c in a.concurrency:
            e = bench_server(url + "/v1/completions", name, prompts[: max(a.requests, 2 * c)], c, a.max_tokens)
            print(f"exq  c={c:3d}: {e['tokens_per_s']:8.1f} tok/s, TTFT {e['ttft_median_s'] * 1e3:7.1f} ms", flush=True)
            res["runs"].append({"concurrency": c, "exq": e})
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    import exq
    from exq.serve.engine import eos_ids

    model = exq.load(a.checkpoint, device=a.device, dtype=getattr(torch, a.dtype) if a.dtype else None)
    dev = next(model.parameters()).device
    res["device"] = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    res["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    pad = (eos_ids(model, tok) or [0])[0]
    bench_generate(model, prompts[:2], 2, 8, pad)  # warm-up
    for r in res["runs"]:
        c = r["concurrency"]
        g = bench_generate(model, prompts[: max(a.requests, 2 * c)], c, a.max_tokens, pad)
        print(
            f"gen  c={r['concurrency']:3d}: {g['tokens_per_s']:8.1f} tok/s, TTFT {g['ttft_median_s'] * 1e3:7.1f} ms",
            flush=True,
        )
        r["generate"] = g
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), res)
    report(res, out)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
