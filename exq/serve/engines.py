"""`exq serve --engine sglang|vllm`: the engine's own OpenAI server on an exq checkpoint, through exq's plugin.

The plugins are entry points of the installed exq package (`sglang.srt.plugins`, `vllm.general_plugins`), so the
engine loads them in every process it starts; this module only checks the engine is there, in a supported version,
and hands the process over to it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from exq.errors import ExqError

PIP = {
    "sglang": "pip install 'sglang>=0.5.20,<0.6' (exq's plugin is tested with 0.5.23)",
    "vllm": "pip install 'vllm>=0.33,<0.34' (exq's plugin is tested with 0.33.0)",
}
NAMES = {"sglang": "SGLang", "vllm": "vLLM"}


def check_engine(engine: str) -> None:
    if engine not in PIP:
        raise ExqError(f"unknown engine {engine!r}", f"use exq, {', '.join(PIP)}")
    if importlib.util.find_spec(engine) is None:
        raise ExqError(f"{NAMES[engine]} is not installed in this Python environment", PIP[engine])
    module = importlib.import_module(engine)
    checker = importlib.import_module(f"exq.integrations.{engine}")
    checker.check_version(module.__version__)


def command(engine: str, checkpoint: Path, host: str, port: int, extra: list[str]) -> list[str]:
    """The engine's server command line for an exq checkpoint."""
    common = ["--quantization", "exq", "--host", host, "--port", str(port), *extra]
    if engine == "sglang":
        return [sys.executable, "-m", "sglang.launch_server", "--model-path", str(checkpoint), *common]
    if engine == "vllm":
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(checkpoint), *common]
    raise ExqError(f"no server command for engine {engine!r}")


def launch(engine: str, checkpoint: Path, host: str, port: int, extra: list[str]) -> int:
    """Replace this process with the engine's server (signals and exit code are then the engine's)."""
    check_engine(engine)
    argv = command(engine, checkpoint, host, port, extra)
    print("exq: " + " ".join(argv), flush=True)
    os.execv(argv[0], argv)
    return 0  # not reached
