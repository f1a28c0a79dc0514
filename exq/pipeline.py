"""The stages chained: profile -> sensitivity -> compile -> quantize, each stage's file cached next to the output.

A cached file is reused only when it was made from the same model (fingerprint), the same text (file hashes) and the
same settings; otherwise it is recomputed and overwritten.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from exq.compiler import Artifact, SensitivityTable, compile_plan
from exq.compiler.solvers import Solution
from exq.data.corpus import Domain, load_domains, resolve_recorded, split_domains
from exq.errors import ExqError, FormatError
from exq.fileio import sha256_file
from exq.models import fingerprint, load_model, load_tokenizer, moe_layers
from exq.models.loading import context_len
from exq.profiling import RoutingProfile, profile_domains
from exq.quant.calibrate import LayerStats, collect_stats
from exq.quant.sensitivity import SensitivityReport, measure_sensitivity, resolve_formats

log = logging.getLogger(__name__)

CALIB_SEQ_LEN = 256
CALIB_SEED = 0


@dataclass
class Calibration:
    """Which text calibrates a model: files (paths as given, hashes), tokens for statistics, tokens for probes."""

    files: list[str]
    sha256: list[str]
    tokens: int
    probe_tokens: int
    seq_len: int = CALIB_SEQ_LEN
    seed: int = CALIB_SEED

    @classmethod
    def of(cls, files: list[str | Path], tokens: int, probe_tokens: int, model: nn.Module) -> Calibration:
        for f in files:
            if not Path(f).is_file():
                raise ExqError(f"corpus file {f} does not exist")
        seq_len = context_len(model, None, CALIB_SEQ_LEN)
        return cls([str(f) for f in files], [sha256_file(f) for f in files], tokens, probe_tokens, seq_len)

    def to_dict(self) -> dict:
        return vars(self).copy()

    @classmethod
    def from_dict(
        cls, d: dict, base: Path | None, override: list[str | Path] | None = None, model: nn.Module | None = None
    ) -> Calibration:
        """The recorded calibration, its files found again (as given, or next to `base`) or replaced by `override`."""
        if override:
            return cls.of(override, int(d["tokens"]), int(d["probe_tokens"]), model)
        files = [str(resolve_recorded(f, h, base)) for f, h in zip(d["files"], d["sha256"], strict=True)]
        return cls(
            files, list(d["sha256"]), int(d["tokens"]), int(d["probe_tokens"]), int(d["seq_len"]), int(d["seed"])
        )

    def full_text(self, tokenizer) -> list[Domain]:
        """Every token of the calibration files (scale tuning wants as much distinct text as there is)."""
        from exq.data.corpus import domain_name, tokenize_file

        return [Domain(domain_name(f), Path(f), tokenize_file(f, tokenizer, None)) for f in self.files]

    def domains(self, tokenizer) -> tuple[list[Domain], list[Domain]]:
        both = load_domains(self.files, tokenizer, self.tokens + self.probe_tokens)
        return split_domains(both, self.tokens)


def calibration_stats(model: nn.Module, calib: list[Domain], seq_len: int, progress: bool) -> list[LayerStats]:
    """Statistics on a float32 copy of the model (gradients through bf16 would blur them)."""
    import copy

    m32 = copy.deepcopy(model).float()
    try:
        return collect_stats(m32, calib, seq_len=seq_len, batch_size=4, seed=CALIB_SEED, progress=progress)
    finally:
        del m32


def sensitivity(
    model: nn.Module,
    tokenizer,
    cal: Calibration,
    formats: str | list[str] | None = None,
    quantizer: str = "gptq",
    progress: bool = True,
) -> tuple[SensitivityTable, SensitivityReport, list[LayerStats]]:
    calib, probe = cal.domains(tokenizer)
    stats = calibration_stats(model, calib, cal.seq_len, progress)
    table, report, stats = measure_sensitivity(
        model, calib, probe, formats, quantizer, seq_len=cal.seq_len, progress=progress, stats=stats
    )
    table.method["calibration"] = cal.to_dict()
    table.method["quantizer_name"] = quantizer
    return table, report, stats


def _load_stage(load, path: Path, fp: dict):
    """A cached stage file of this model, or None (absent, or unreadable: then it is simply recomputed)."""
    if not path.is_file():
        return None
    try:
        return load(path, model=fp)
    except (FormatError, ExqError) as e:
        log.info("not reusing %s: %s", path, e)
        return None


def _cached_profile(path: Path, fp: dict, cal: Calibration) -> RoutingProfile | None:
    prof = _load_stage(RoutingProfile.load, path, fp)
    if prof is None:
        return None
    same = [d.sha256 for d in prof.domains] == cal.sha256 and prof.tokens == cal.tokens
    return prof if same else None


def _cached_table(
    path: Path, fp: dict, cal: Calibration, formats: list[str], quantizer: str
) -> SensitivityTable | None:
    table = _load_stage(SensitivityTable.load, path, fp)
    if table is None:
        return None
    rec = table.method.get("calibration", {})
    same = (
        rec.get("sha256") == cal.sha256
        and rec.get("tokens") == cal.tokens
        and rec.get("probe_tokens") == cal.probe_tokens
        and set(formats) <= set(table.formats)  # a table measured for more formats serves a subset
        and table.method.get("quantizer_name") == quantizer
    )
    return table if same else None


def stage_paths(output: Path) -> tuple[Path, Path]:
    """Stage files live beside the plan under fixed names, so plans at several budgets share them."""
    return output.parent / "profile.json", output.parent / "sensitivity.json"


def compile_from_model(
    model_path: str | Path,
    corpus: list[str | Path],
    budget: str,
    output: str | Path,
    *,
    tokens: int = 32768,
    probe_tokens: int = 8192,
    formats: str | list[str] | None = None,
    quantizer: str = "gptq",
    granularity: str = "block",
    solver: str = "milp",
    device: str | None = "auto",
    progress: bool = True,
    kernel_tables: dict | None = None,
) -> tuple[Artifact, Solution, dict]:
    """Profile + sensitivity + compile in one go; returns the plan, the solution and which stages were cached.
    kernel_tables: pass D's tables (`compile_plan`)."""
    output = Path(output)
    model = load_model(model_path, device=device)
    cal = Calibration.of(list(corpus), tokens, probe_tokens, model)
    tok = load_tokenizer(model_path)
    fp = fingerprint(model, moe_layers(model))
    formats = resolve_formats(moe_layers(model), formats)
    prof_path, sens_path = stage_paths(output)
    cached = {}
    prof = _cached_profile(prof_path, fp, cal)
    cached["profile"] = prof is not None
    if prof is None:
        calib, _ = cal.domains(tok)
        prof = profile_domains(model, calib, seq_len=cal.seq_len, progress=progress)
        prof.save(prof_path)
    table = _cached_table(sens_path, fp, cal, formats, quantizer)
    cached["sensitivity"] = table is not None
    if table is None:
        table, _, _ = sensitivity(model, tok, cal, formats, quantizer, progress)
        table.save(sens_path)
    candidates = formats if "bf16" in formats else ["bf16", *formats]  # bf16 is always a candidate
    art, sol = compile_plan(
        prof, budget, sensitivity=table, granularity=granularity, solver=solver, formats=candidates,
        kernel_tables=kernel_tables,
    )  # fmt: skip
    art.save(output)
    return art, sol, cached


def quantize_to_checkpoint(
    model_path: str | Path,
    artifact_path: str | Path,
    output: str | Path,
    *,
    corpus: list[str | Path] | None = None,
    quantizer: str = "auto",
    device: str | None = "auto",
    overwrite: bool = False,
    tune_steps: int = 0,
    progress: bool = True,
) -> tuple[Path, int, int]:
    """Write the packed checkpoint of a plan. Returns (folder, bytes of the quantized file, bytes the plan counts).

    tune_steps > 0 fits the scales to the model's output on the calibration text after quantizing (see tune.py).
    """
    from exq.quant.apply import quantize_experts, quantize_linears
    from exq.quant.checkpoint import QUANTIZED_FILE, write_checkpoint

    artifact_path = Path(artifact_path)
    model = load_model(model_path, device=device)
    fp = fingerprint(model, moe_layers(model))
    art = Artifact.load(artifact_path, model=fp)
    recorded = art.cost_source.get("method", {}).get("calibration")
    stats = cal = None
    if quantizer == "auto":
        quantizer = "gptq" if (recorded or corpus) else "clip"
    if recorded:
        cal = Calibration.from_dict(recorded, artifact_path.parent, corpus, model)
    elif corpus:
        cal = Calibration.of(list(corpus), 32768, 0, model)
    if (quantizer == "gptq" or tune_steps > 0) and cal is None:
        raise ExqError("GPTQ and scale tuning need calibration text and this plan records none", "pass --corpus FILES")
    tok = load_tokenizer(model_path)
    if quantizer == "gptq":
        calib, _ = cal.domains(tok)
        stats = calibration_stats(model, calib, cal.seq_len, progress)
    with torch.no_grad():
        tensors = quantize_experts(model, art, stats, quantizer, progress) | quantize_linears(model, art)
    if tune_steps > 0:
        tensors = _tuned(model, art, tensors, cal.full_text(tok), tune_steps, quantizer, progress)
    src = Path(str(model_path)) if Path(str(model_path)).is_dir() else None
    out = write_checkpoint(model, art, tensors, output, src, quantizer, overwrite=overwrite)
    return out, (out / QUANTIZED_FILE).stat().st_size, art.summary()["bytes"]


def _tuned(
    model: nn.Module, art: Artifact, tensors: dict, text: list[Domain], steps: int, quantizer: str, progress: bool
) -> dict:
    """The quantized tensors with scales tuned end to end (codes untouched)."""
    from exq.quant.checkpoint import base_state, quantization_config
    from exq.quant.tune import tune_scales
    from exq.runtime.load import assemble

    base = base_state(model, art)
    qc = quantization_config(model, art, quantizer, "")
    qmodel = assemble(
        copy.deepcopy(model.config), qc, base | tensors, device=next(model.parameters()).device, dtype=model.dtype
    )
    tune_scales(qmodel, model, text, steps, progress=progress)
    state = qmodel.state_dict()
    return {k: (state[k].detach().cpu().contiguous() if k.endswith(".scales") else v) for k, v in tensors.items()}
