"""Test data: the shared fixture models and corpus when present (../shared or $EXQ_SHARED), else the bundled demo."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _shared() -> Path | None:
    for cand in (os.environ.get("EXQ_SHARED"), REPO.parent / "shared"):
        if cand and (Path(cand) / "models").is_dir() and (Path(cand) / "corpus").is_dir():
            return Path(cand)
    return None


SHARED = _shared()
# EXQ_TEST_DEVICE=cuda runs the device-aware tests (profiling) on a GPU; CI is CPU only.
DEVICE = os.environ.get("EXQ_TEST_DEVICE", "cpu")
# Triton kernels run on the CPU through Triton's interpreter; it must be chosen before any kernel is defined.
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEMO_MODEL = REPO / "demo" / "model"
DEMO_CORPUS = REPO / "demo" / "corpus"

if SHARED is not None:
    REAL_MODELS = {
        n: SHARED / "models" / n for n in ("olmoe-mini", "qwen3moe-mini") if (SHARED / "models" / n).is_dir()
    }
    CORPUS_DIR = SHARED / "corpus"
    DOMAINS = ("austen", "shakespeare", "kjv", "pydocs")
else:
    REAL_MODELS = {"demo": DEMO_MODEL}
    CORPUS_DIR = DEMO_CORPUS
    DOMAINS = ("austen", "kjv")


def corpus_file(domain: str, split: str) -> Path:
    return CORPUS_DIR / f"{domain}.{split}.txt.gz"


@pytest.fixture(scope="session", params=sorted(REAL_MODELS), ids=sorted(REAL_MODELS))
def real_model_path(request) -> Path:
    return REAL_MODELS[request.param]


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    return DEMO_MODEL


@pytest.fixture(scope="session")
def demo_profile():
    """The demo model profiled on both demo domains (4,000 tokens): shapes fit every group-128 format."""
    from exq.profiling import profile

    files = [DEMO_CORPUS / "austen.valid.txt.gz", DEMO_CORPUS / "kjv.valid.txt.gz"]
    return profile(DEMO_MODEL, files, 4000, seq_len=256, batch_size=4, device="cpu", progress=False)


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory, demo_profile):
    """budget -> an exq checkpoint (folder `demo-q`) of the demo model at that budget, in the formats the fused kernels
    run, RTN-quantized (quick): what the serving and engine tests load."""
    made: dict[str, Path] = {}

    def make(budget: str) -> Path:
        if budget not in made:
            from exq.compiler import compile_plan
            from exq.models import load_model
            from exq.quant.apply import quantize_experts
            from exq.quant.checkpoint import write_checkpoint

            art, _ = compile_plan(demo_profile, budget, granularity="block", formats="bf16,int8,int4,int4-asym")
            model = load_model(DEMO_MODEL, device="cpu")
            tensors = quantize_experts(model, art, None, "rtn", progress=False)
            out = tmp_path_factory.mktemp("ckpt") / "demo-q"
            made[budget] = write_checkpoint(model, art, tensors, out, DEMO_MODEL, "rtn")
        return made[budget]

    return make
