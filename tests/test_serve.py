"""`exq serve` driven by the official `openai` client, checked against transformers `generate` on the same weights.

The server runs in this process (a thread, a free port) on an exq checkpoint of the demo model with mixed formats;
activations in float32 so greedy decoding is deterministic enough to compare token for token. EXQ_TEST_DEVICE=cuda
runs it on a GPU.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import DEMO_CORPUS, DEMO_MODEL, DEVICE

import exq
from exq.serve import build
from exq.serve.background import BackgroundServer, wait_healthy

PROMPTS = [
    "It is a truth universally acknowledged",
    "And God said, Let there be",
    "The LORD is my shepherd",
    "Elizabeth was",
    "In the beginning",
    "Mr. Darcy",
]


@pytest.fixture(scope="module")
def checkpoint(demo_checkpoint) -> Path:
    return demo_checkpoint("4.5bpw")


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The same checkpoint through exq.load + transformers generate (greedy)."""
    model = exq.load(checkpoint, device=DEVICE, dtype=torch.float32)
    tok = exq.models.load_tokenizer(checkpoint)

    def greedy(ids: list[int], n: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids], device=model.device),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        return out[0, len(ids) :].tolist()

    return tok, greedy


def _start(checkpoint, **kw):
    app, engine = build(checkpoint, device=DEVICE, dtype="float32", **kw)
    return BackgroundServer(app), engine


@pytest.fixture(scope="module")
def server(checkpoint):
    srv, _ = _start(checkpoint, max_batch=12, max_model_len=256)
    with srv:
        yield srv


def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_completions_greedy_equal_generate_token_for_token(server, reference):
    tok, greedy = reference
    c = client(server)
    for p in PROMPTS[:3]:
        r = c.completions.create(
            model="demo-q", prompt=p, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
        )
        want = greedy(tok(p).input_ids, 24)
        assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens == len(tok(p).input_ids)
        assert r.choices[0].text == tok.decode(want, skip_special_tokens=True)
        assert r.choices[0].finish_reason == "length"
    # token ids as the prompt: the same continuation
    ids = tok(PROMPTS[0]).input_ids
    r = c.completions.create(model="demo-q", prompt=ids, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode(greedy(ids, 8), skip_special_tokens=True)


def test_chat_streaming_and_not_agree_with_generate(server, reference):
    from exq.serve.app import chat_prompt

    tok, greedy = reference
    c = client(server)
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who is Mr. Bennet?"}]
    want = tok.decode(greedy(chat_prompt(tok, msgs), 16), skip_special_tokens=True)
    r = c.chat.completions.create(
        model="demo-q", messages=msgs, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    stream = c.chat.completions.create(
        model="demo-q",
        messages=msgs,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16
    # completions streaming
    text = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model="demo-q",
            prompt=PROMPTS[3],
            max_tokens=12,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert text == tok.decode(greedy(tok(PROMPTS[3]).input_ids, 12), skip_special_tokens=True)


def test_32_concurrent_streams_complete_correct_and_unmixed(server, reference):
    """32 streams against 12 slots: requests queue, join and leave the batch at different steps (different lengths),
    and every one must still equal its own greedy generation."""
    tok, greedy = reference
    prompts = [f"{PROMPTS[i % len(PROMPTS)]}{' and' * (i // len(PROMPTS))}" for i in range(32)]
    lengths = [6 + (i * 7) % 19 for i in range(32)]

    async def one(ac: openai.AsyncOpenAI, p: str, n: int) -> str:
        parts = []
        stream = await ac.completions.create(
            model="demo-q", prompt=p, max_tokens=n, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        async for ch in stream:
            parts.append(ch.choices[0].text)
        return "".join(parts)

    async def all_of():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
        return await asyncio.gather(*(one(ac, p, n) for p, n in zip(prompts, lengths, strict=True)))

    got = asyncio.run(all_of())
    for p, n, text in zip(prompts, lengths, got, strict=True):
        assert text == tok.decode(greedy(tok(p).input_ids, n), skip_special_tokens=True), p


def test_sampling_options(server, reference):
    tok, greedy = reference
    c = client(server)
    args = dict(model="demo-q", prompt=PROMPTS[1], max_tokens=16, extra_body={"ignore_eos": True})
    a = c.completions.create(temperature=1.0, seed=7, **args).choices[0].text
    b = c.completions.create(temperature=1.0, seed=7, **args).choices[0].text
    assert a == b  # a seed makes sampling reproducible
    others = {c.completions.create(temperature=1.0, seed=s, **args).choices[0].text for s in range(8, 12)}
    assert len(others | {a}) > 1  # and different seeds sample differently
    want = tok.decode(greedy(tok(PROMPTS[1]).input_ids, 16), skip_special_tokens=True)
    top1 = c.completions.create(
        temperature=0.8,
        seed=3,
        extra_body={"ignore_eos": True, "top_k": 1},
        **{k: v for k, v in args.items() if k != "extra_body"},
    )
    assert top1.choices[0].text == want  # top_k = 1 leaves only the argmax
    tiny_p = c.completions.create(temperature=1.0, top_p=1e-6, seed=3, **args)
    assert tiny_p.choices[0].text == want  # so does a vanishing top_p
    # a stop string inside the greedy text: the text ends right before it
    stop = want[len(want) // 2 : len(want) // 2 + 3]
    r = c.completions.create(model="demo-q", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == want[: want.index(stop)] and r.choices[0].finish_reason == "stop"


def _error(e: openai.APIStatusError) -> dict:
    body = e.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    c = client(server)
    raw = httpx.post(server.url + "/v1/completions", content=b'{"model": "demo-q", "prompt": ', timeout=30)
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert _error(e.value)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="demo-q", prompt="hi", max_tokens=100_000)
    assert _error(e.value)["param"] == "max_tokens"
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(model="demo-q", prompt="word " * 400, max_tokens=2)
    assert e.value.status_code == 413 and _error(e.value)["code"] == "context_length_exceeded"
    for bad in ({"n": 2}, {"logprobs": 2}, {"temperature": -1}, {"presence_penalty": 0.5}):
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="demo-q", prompt="hi", max_tokens=2, **bad)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="demo-q", messages=[], max_tokens=2)
    assert httpx.get(server.url + "/v1/nothing", timeout=30).json()["error"]["type"] == "not_found_error"
    r = c.completions.create(model="demo-q", prompt="After all that", max_tokens=4)
    assert r.usage.completion_tokens >= 1  # still serving


def test_models_health_metrics(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["demo-q"]
    assert httpx.get(server.url + "/health", timeout=30).json()["status"] == "ok"
    c.completions.create(model="demo-q", prompt="Hello", max_tokens=3, extra_body={"ignore_eos": True})
    text = httpx.get(server.url + "/metrics", timeout=30).text
    count = float(re.search(r'^exq_requests_total\{endpoint="completions",status="200"\} (\S+)', text, re.M)[1])
    assert count >= 1
    for name in (
        "exq_generation_tokens_total",
        "exq_queue_depth",
        "exq_time_to_first_token_seconds_bucket",
        "exq_request_latency_seconds_count",
    ):
        assert re.search(rf"^{name}", text, re.M), name


def test_disconnect_frees_the_slot_and_full_queue_gets_429(checkpoint):
    srv, engine = _start(checkpoint, max_batch=1, max_queue=1, max_model_len=512)
    with srv:
        url = srv.url + "/v1/completions"
        body = {"model": "demo-q", "prompt": "a", "max_tokens": 400, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=60) as h, h.stream("POST", url, json=body) as resp:
            next(resp.iter_lines())  # the stream started: it holds the only slot
        deadline = time.monotonic() + 30
        while engine.running_count() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.running_count() == 0  # the slot was freed long before 400 tokens
        r = client(srv).completions.create(model="demo-q", prompt="b", max_tokens=3, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3
        assert 'exq_finished_requests_total{reason="cancelled"} 1.0' in httpx.get(srv.url + "/metrics").text

        async def three():
            async with httpx.AsyncClient(timeout=120) as h:
                long = {"model": "demo-q", "prompt": "a", "max_tokens": 300, "ignore_eos": True}
                first = asyncio.ensure_future(h.post(url, json=long))
                deadline = time.monotonic() + 30  # wait until it holds the only slot: the queue is empty again
                while engine.running_count() == 0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                rest = await asyncio.gather(*(h.post(url, json=long) for _ in range(2)))
                return [await first, *rest]

        codes = sorted(r.status_code for r in asyncio.run(three()))
        assert codes == [200, 200, 429]  # one running, one queued, the third refused
    assert not engine.alive  # stopped with the server


def test_serve_refuses_a_plain_model_without_budget(capsys):
    from exq.cli import main

    assert main(["serve", "--model", str(DEMO_MODEL)]) == 2
    assert "--budget" in capsys.readouterr().err


def test_serve_from_a_plain_model_runs_the_pipeline_once(tmp_path, monkeypatch):
    """--budget on a plain model: profile -> sensitivity -> compile -> quantize, then a second call reuses it all."""
    from exq.serve import prepare

    corpus = [str(DEMO_CORPUS / "austen.valid.txt.gz")]
    calls = []
    import exq.pipeline as pipeline

    orig = pipeline.quantize_to_checkpoint
    monkeypatch.setattr(pipeline, "quantize_to_checkpoint", lambda *a, **k: calls.append(1) or orig(*a, **k))
    monkeypatch.setattr(pipeline, "compile_from_model", _small(pipeline.compile_from_model))
    ckpt = prepare(str(DEMO_MODEL), "int4", corpus, tmp_path / "work", progress=False, device="cpu")
    assert (ckpt / "config.json").is_file() and len(calls) == 1
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["quant_method"] == "exq"
    assert {p.name for p in (tmp_path / "work").iterdir()} >= {"profile.json", "sensitivity.json", "plan-int4.json"}
    assert prepare(str(DEMO_MODEL), "int4", corpus, tmp_path / "work", progress=False, device="cpu") == ckpt
    assert len(calls) == 1  # the checkpoint was reused
    assert prepare(str(ckpt), None) == ckpt  # a checkpoint serves as is


def test_serve_on_a_gpu_offers_the_fast_kernel_formats(tmp_path, monkeypatch):
    """Quantizing for a GPU, the candidate formats default to those the fused op runs at int4 speed or better: no
    int3 (its layers take about twice an int4 layer's time) and no int2 (no kernel)."""
    import exq.models.loading as loading
    import exq.pipeline as pipeline
    from exq.kernels.configs import KERNEL_FORMATS
    from exq.serve import prepare

    seen = {}

    class Stop(Exception):
        pass

    def capture(*a, formats=None, **k):
        seen["formats"] = formats
        raise Stop

    monkeypatch.setattr(loading, "resolve_device", lambda d: torch.device("cuda"))
    monkeypatch.setattr(pipeline, "compile_from_model", capture)
    with pytest.raises(Stop):
        prepare(str(DEMO_MODEL), "int4", [str(DEMO_CORPUS / "austen.valid.txt.gz")], tmp_path, progress=False)
    offered = seen["formats"].split(",")
    assert set(offered) <= set(KERNEL_FORMATS) and "int4" in offered
    assert not any(f.startswith(("int3", "int2")) for f in offered)
    with pytest.raises(Stop):  # named formats pass through as given
        prepare(str(DEMO_MODEL), "int4", [str(DEMO_CORPUS / "austen.valid.txt.gz")], tmp_path, False, "int4,int3")
    assert seen["formats"] == "int4,int3"


def _small(compile_from_model):
    """The pipeline with fewer calibration tokens (the test checks the chaining and caching, not quality)."""

    def run(*a, **k):
        return compile_from_model(*a, **(k | {"tokens": 2048, "probe_tokens": 1024}))

    return run


def _generate_all(engine, prompts: list[list[int]], lengths: list[int]) -> list[list[int]]:
    """Run the engine on its own thread until every request finished; the tokens of each."""
    import threading

    from exq.serve.engine import Request
    from exq.serve.sampling import SamplingParams

    out: list[list[int]] = [[] for _ in prompts]
    left = threading.Semaphore(0)

    def sink(i):
        def take(ev):
            out[i].extend(ev.token_ids)
            if ev.finish_reason is not None:
                left.release()

        return take

    for i, (ids, n) in enumerate(zip(prompts, lengths, strict=True)):
        engine.submit(Request(ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), sink(i)))
    engine.start()
    try:
        for _ in prompts:
            assert left.acquire(timeout=120)
    finally:
        engine.stop()
    return out


def test_bucketed_full_length_decode_equals_generate(checkpoint, reference):
    """The inputs a CUDA graph replays — the batch padded to a bucket, attention over the whole cache length — give
    every sequence its own greedy continuation while the batch shrinks through the buckets (6 -> 4 -> 2 -> 1)."""
    from exq.serve.engine import Engine
    from exq.serve.graphs import DecodeGraphs

    tok, greedy = reference
    model = exq.load(checkpoint, device=DEVICE, dtype=torch.float32)
    engine = Engine(model, tok, max_batch=6, max_model_len=96)
    engine.graphs = graphs = DecodeGraphs(engine, capture=False)
    assert graphs.capture() and graphs.buckets == [1, 2, 4, 6]
    prompts = [tok(p).input_ids for p in PROMPTS]
    lengths = [5 + 4 * i for i in range(len(PROMPTS))]
    for ids, n, got in zip(prompts, lengths, _generate_all(engine, prompts, lengths), strict=True):
        assert got == greedy(ids, n)


def test_captured_decode_graphs_replay_the_eager_step(checkpoint):
    """On a GPU: the bf16 model's decode step (fused MoE kernels) captures, and a replay gives the eager step's
    logits. On a CPU there is nothing to capture: warmup runs nothing and the engine keeps the eager step."""
    from exq.serve.engine import Engine, Request
    from exq.serve.sampling import SamplingParams

    model = exq.load(checkpoint, device=DEVICE)
    tok = exq.models.load_tokenizer(checkpoint)
    engine = Engine(model, tok, max_batch=4, max_model_len=64)
    shapes = engine.warmup()
    if DEVICE == "cpu":
        assert shapes == 0 and engine.graphs is None
        return
    assert engine.graphs is not None and sorted(engine.graphs.graphs) == [1, 2, 4]
    for p in PROMPTS[:3]:
        engine.submit(Request(tok(p).input_ids, SamplingParams(temperature=0, max_tokens=8), lambda ev: None))
    with torch.inference_mode():
        engine._prefill(engine._admit())
        last, lengths = [r.output_ids[-1] for r in engine.running], [r.length for r in engine.running]
        replayed = engine.graphs.run(last, lengths).float().clone()
        eager = engine.eager_step(last, lengths).float()
    assert replayed.shape == eager.shape == (3, model.config.vocab_size)
    assert (replayed - eager).abs().max() <= 2e-2 * eager.abs().max()
    assert torch.equal(replayed.argmax(-1), eager.argmax(-1))


def test_exq_serve_command_drains_open_requests_on_sigterm(checkpoint):
    """The real command (engine on the main thread, uvicorn on a second one): SIGTERM lets the open request finish,
    then the process exits cleanly."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import threading

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "exq", "serve", "--model", str(checkpoint), "--port", str(port), "--device", "cpu"]
    cmd += ["--threads", "1"]  # one torch thread: no OpenMP team to stall when the test machine is busy
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 120, alive=lambda: proc.poll() is None)
        result = {}
        body = {"model": "demo-q", "prompt": "It is", "max_tokens": 40, "ignore_eos": True, "temperature": 0}

        def ask() -> None:
            result["r"] = httpx.post(url + "/v1/completions", json=body, timeout=120)
            result["done"] = time.monotonic()

        t = threading.Thread(target=ask)
        t.start()
        while httpx.get(url + "/health", timeout=5).json()["running"] == 0:
            time.sleep(0.02)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert result["done"] > signalled  # the request was still open when the signal came
        assert result["r"].status_code == 200, result["r"].text
        assert result["r"].json()["usage"]["completion_tokens"] == 40
        assert proc.wait(60) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    assert "exq: serving demo-q" in out and "Application shutdown complete" in out


def test_serve_with_another_engine_says_what_is_missing(capsys):
    import importlib.util

    from exq.cli import main

    for engine, pip in (("sglang", "pip install 'sglang"), ("vllm", "pip install 'vllm")):
        if importlib.util.find_spec(engine) is None:  # the main test venv; the engine venv runs the plugin tests
            assert main(["serve", "--model", str(DEMO_MODEL), "--engine", engine]) == 2
            assert pip in capsys.readouterr().err
