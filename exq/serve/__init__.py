"""`exq serve`: an exq checkpoint (or a Hugging Face MoE model, quantized on the way) behind an OpenAI-compatible
HTTP server with continuous batching. Public entry: `serve`; `build` gives the app without running it (tests)."""

from __future__ import annotations

import logging
from pathlib import Path

from exq.errors import ExqError

log = logging.getLogger(__name__)

DEFAULT_PORT = 30000


def _is_exq_checkpoint(path: Path) -> bool:
    import json

    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config")
    except (OSError, ValueError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "exq"


def default_corpus() -> list[Path]:
    """Calibration text when none is given: the validation splits bundled with the demo (English prose)."""
    root = Path(__file__).resolve().parents[2] / "demo" / "corpus"
    files = sorted(root.glob("*.valid.txt.gz"))
    if not files:
        raise ExqError("no calibration text given and the bundled demo corpus is not here", "pass --corpus FILES")
    return files


def prepare(
    model: str,
    budget: str | None,
    corpus: list[str] | None = None,
    work_dir: str | Path | None = None,
    progress: bool = True,
    formats: str | None = None,
    device: str = "auto",
) -> Path:
    """An exq checkpoint folder for `model`: itself if it is one, else profile -> sensitivity -> compile -> quantize
    into work_dir, every stage's file cached there and reused when its inputs are unchanged. Serving on a GPU, the
    candidate formats default to the fused kernels' fast ones (`SERVING_FORMATS`: no int3, no int2)."""
    p = Path(model).expanduser()
    if _is_exq_checkpoint(p):
        if budget is not None:
            raise ExqError(f"{model} is already an exq checkpoint", "drop --budget (or point --model at the original)")
        return p
    if budget is None:
        raise ExqError(
            f"{model} is not an exq checkpoint",
            "add --budget (e.g. --budget int4) to quantize it first, or give a folder written by `exq quantize`",
        )
    from exq.fileio import sha256_file
    from exq.kernels.configs import SERVING_FORMATS
    from exq.models.loading import resolve_device
    from exq.pipeline import compile_from_model, quantize_to_checkpoint
    from exq.quant.checkpoint import PLAN_FILE, read_quantization_config

    if formats is None and resolve_device(device).type == "cuda":
        formats = ",".join(SERVING_FORMATS)
    files = [Path(f) for f in corpus] if corpus else default_corpus()
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(model).rstrip("/").split("/")[-1])
    work = Path(work_dir) if work_dir else Path("runs") / "serve" / slug
    tag = budget + ("" if formats is None else "-" + formats.replace(",", "_"))
    plan, ckpt = work / f"plan-{tag}.json", work / f"q-{tag}"
    _, _, cached = compile_from_model(model, files, budget, plan, formats=formats, progress=progress)
    log.info("stages reused: %s", ", ".join(k for k, v in cached.items() if v) or "none")
    if ckpt.is_dir():
        try:
            _, qc = read_quantization_config(ckpt)
            if qc.get("plan_sha256") == sha256_file(plan) and sha256_file(ckpt / PLAN_FILE) == sha256_file(plan):
                log.info("reusing the quantized checkpoint %s", ckpt)
                return ckpt
        except ExqError as e:
            log.info("re-quantizing: %s", e)
    quantize_to_checkpoint(model, plan, ckpt, overwrite=True, progress=progress)
    return ckpt


def build(
    checkpoint: str | Path,
    *,
    device: str = "auto",
    dtype: str | None = None,
    max_batch: int = 32,
    max_model_len: int | None = None,
    max_queue: int = 256,
    max_tokens: int | None = None,
    served_name: str | None = None,
    own_engine: bool = True,
    kernel_tables: list | tuple = (),
):
    """(FastAPI app, engine) for a checkpoint; with own_engine the engine runs on a thread started by the app."""
    import torch

    from exq.models.loading import load_tokenizer
    from exq.runtime import load
    from exq.serve.app import Limits, create_app
    from exq.serve.engine import Engine

    if max_batch < 1:
        raise ExqError(f"--max-batch {max_batch}", "use at least 1")
    torch_dtype = getattr(torch, dtype) if dtype else None
    if dtype and not isinstance(torch_dtype, torch.dtype):
        raise ExqError(f"unknown dtype {dtype!r}", "use bfloat16, float16 or float32")
    model = load(checkpoint, device=device, dtype=torch_dtype, kernel_tables=kernel_tables)
    tokenizer = load_tokenizer(checkpoint)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    length = min(max_model_len or min(context, 4096), context)
    if length < 2:
        raise ExqError(f"--max-model-len {length}", "use at least 2")
    engine = Engine(model, tokenizer, max_batch=max_batch, max_model_len=length, max_queue=max_queue)
    name = served_name or Path(checkpoint).resolve().name
    return create_app(engine, tokenizer, name, Limits(max_tokens=max_tokens), own_engine), engine


def serve(
    checkpoint: str | Path,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    log_level: str = "info",
    cuda_graphs: bool = True,
    threads: int | None = None,
    **kwargs,
) -> None:
    """Serve until SIGINT / SIGTERM; open requests finish first (up to 30 s).

    The engine loop owns the main thread (torch's CPU kernels run fastest there) and uvicorn runs on a second
    thread; the signal handlers below start uvicorn's graceful shutdown, and the engine stops once it has drained."""
    import signal
    import threading
    import time

    import torch
    import uvicorn

    app, engine = build(checkpoint, own_engine=False, **kwargs)
    if threads:
        torch.set_num_threads(threads)  # CPU: torch's intra-op threads (default: torch's own choice)
    served = kwargs.get("served_name") or Path(checkpoint).resolve().name
    url = f"http://{'localhost' if host in ('0.0.0.0', '::') else host}:{port}"
    app.state.banner = (
        f"exq: serving {served} on {engine.device} (up to {engine.max_batch} sequences of {engine.max_model_len} "
        f"tokens) at {url}/v1\n"
        f"exq: try  curl {url}/v1/completions -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{served}", "prompt": "It is a truth", "max_tokens": 32}}\''
    )
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
    )

    def on_signal(signum, frame) -> None:
        if server.should_exit:  # a second Ctrl-C: stop now
            server.force_exit = True
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    http = threading.Thread(target=server.run, name="exq-http", daemon=True)

    def stop_engine_after_http() -> None:
        http.join()
        engine.stop()

    t0 = time.perf_counter()
    if n := engine.warmup(graphs=cuda_graphs):
        how = "decode in CUDA graphs" if engine.graphs else "decode without CUDA graphs"
        print(f"exq: warmed up {n} batch shapes in {time.perf_counter() - t0:.1f} s ({how})", flush=True)
    engine.open()
    http.start()
    threading.Thread(target=stop_engine_after_http, daemon=True).start()
    engine.run()
    if not server.started:
        raise ExqError(f"the HTTP server did not start on {host}:{port}", "is the port in use? pick one with --port")
