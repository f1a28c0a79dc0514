"""`exq serve`."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from exq.commands.common import add_kernel_table, positive_int


def port_number(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


def add(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser(
        "serve",
        help="serve an exq model behind an OpenAI-compatible HTTP API (port 30000)",
        description="Serve an exq checkpoint with continuous batching: /v1/completions, /v1/chat/completions "
        "(streaming or not), /v1/models, /health, /metrics. Given a Hugging Face model and --budget instead, runs "
        "profile -> sensitivity -> compile -> quantize first (each stage's file cached under --work-dir).",
    )
    p.add_argument("--model", required=True, help="an exq checkpoint folder, or a HF MoE model (path or id) + --budget")
    p.add_argument("--budget", help="quantize first at this budget (int4, 4.25bpw, 3.2GB...), as `exq compile`")
    p.add_argument("--corpus", nargs="+", metavar="FILE", help="calibration text for --budget (default: the demo's)")
    p.add_argument("--formats", help="--budget's candidate formats (default: all; on a GPU those with kernels)")
    p.add_argument("--work-dir", help="where --budget's stage files and checkpoint go (default runs/serve/NAME)")
    p.add_argument(
        "--engine",
        choices=["exq", "sglang", "vllm"],
        default="exq",
        help="exq's embedded server (default), or SGLang's / vLLM's OpenAI server with exq's plugin (arguments "
        "after -- go to the engine)",
    )
    p.add_argument("engine_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=30000)
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1...")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="activations (default: the model's)")
    p.add_argument("--max-batch", type=positive_int, default=32, help="sequences decoded together (KV cache slots)")
    p.add_argument("--max-model-len", type=positive_int, help="tokens per sequence (default min(context, 4096))")
    p.add_argument("--max-queue", type=positive_int, default=256, help="waiting requests before 429")
    p.add_argument("--max-tokens", type=positive_int, help="largest max_tokens a request may ask for")
    p.add_argument("--threads", type=positive_int, help="CPU: torch threads (default: torch's choice)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="launch every decode step's kernels eagerly (GPU)")
    p.add_argument("--served-model-name", help="the model id clients use (default: the checkpoint folder's name)")
    add_kernel_table(p, "the checkpoint's layers planned again with them (exq's engine)")

    def run(a: argparse.Namespace) -> int:
        from exq.errors import ExqError
        from exq.kernels.tuning import kernel_tables
        from exq.serve import prepare, serve
        from exq.serve.engines import check_engine, launch

        if a.engine != "exq":
            if a.kernel_table:
                raise ExqError("--kernel-table applies to exq's own engine", "drop it, or serve with --engine exq")
            check_engine(a.engine)  # before any quantization work
        kernel_tables(a.kernel_table)  # a bad table fails before any quantization work
        ckpt = prepare(a.model, a.budget, a.corpus, a.work_dir, formats=a.formats, device=a.device)
        if a.engine != "exq":
            return launch(a.engine, ckpt, a.host, a.port, [x for x in a.engine_args if x != "--"])
        serve(
            ckpt,
            host=a.host,
            port=a.port,
            device=a.device,
            dtype=a.dtype,
            max_batch=a.max_batch,
            max_model_len=a.max_model_len,
            max_queue=a.max_queue,
            max_tokens=a.max_tokens,
            served_name=a.served_model_name,
            cuda_graphs=not a.no_cuda_graphs,
            threads=a.threads,
            kernel_tables=a.kernel_table,
        )
        return 0

    return run
