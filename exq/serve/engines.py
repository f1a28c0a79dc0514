"""`exq serve --engine sglang`: the engine's own OpenAI server on an exq checkpoint, through exq's plugin.

The plugin is an entry point of the installed exq package (`sglang.srt.plugins`), so SGLang loads it in every process
it starts; this module only checks the engine is there, in a supported version, and hands the process over to it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from exq.errors import ExqError

PIP = {"sglang": "pip install 'sglang>=0.5.20,<0.6' (exq's plugin is tested with 0.5.23)"}


def check_engine(engine: str) -> None:
    if engine == "vllm":
        raise ExqError("exq's vLLM plugin is not available yet", "use --engine exq (default) or --engine sglang")
    if engine != "sglang":
        raise ExqError(f"unknown engine {engine!r}", "use exq, sglang")
    if importlib.util.find_spec("sglang") is None:
        raise ExqError("SGLang is not installed in this Python environment", PIP["sglang"])
    import sglang

    from exq.integrations.sglang import check_version

    check_version(sglang.__version__)


def command(engine: str, checkpoint: Path, host: str, port: int, extra: list[str]) -> list[str]:
    """The engine's server command line for an exq checkpoint."""
    if engine != "sglang":
        raise ExqError(f"no server command for engine {engine!r}")
    base = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(checkpoint)]
    return [*base, "--quantization", "exq", "--host", host, "--port", str(port), *extra]


def launch(engine: str, checkpoint: Path, host: str, port: int, extra: list[str]) -> int:
    """Replace this process with the engine's server (signals and exit code are then the engine's)."""
    check_engine(engine)
    argv = command(engine, checkpoint, host, port, extra)
    print("exq: " + " ".join(argv), flush=True)
    os.execv(argv[0], argv)
    return 0  # not reached
