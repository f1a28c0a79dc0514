"""The `exq` command: help, a real profile run, and a clear one-line error (no traceback) for each user mistake."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest
from conftest import DEMO_CORPUS, DEMO_MODEL
from transformers import AutoModelForCausalLM, LlamaConfig

from exq.cli import main
from exq.profiling import RoutingProfile

CORPUS = str(DEMO_CORPUS / "austen.valid.txt.gz")


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_the_stages():
    res = subprocess.run([sys.executable, "-m", "exq", "--help"], capture_output=True, text=True, check=True)
    assert "profile" in res.stdout and "stages" in res.stdout
    assert subprocess.run([sys.executable, "-m", "exq", "--version"], capture_output=True, text=True).stdout.startswith(
        "exq "
    )


def test_profile_command_writes_a_valid_profile(tmp_path, capsys):
    out = tmp_path / "runs" / "prof.json"
    code, stdout, err = run(
        capsys,
        "profile",
        "--model",
        str(DEMO_MODEL),
        "--corpus",
        CORPUS,
        str(DEMO_CORPUS / "kjv.valid.txt.gz"),
        "--tokens",
        "3000",
        "--seq-len",
        "256",
        "--output",
        str(out),
    )
    assert code == 0, err
    assert "wrote" in stdout and "austen.valid" in stdout
    prof = RoutingProfile.load(out)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert prof.tokens == 3000 and prof.domain_names == ["austen.valid", "kjv.valid"]
    assert [d.tokens for d in prof.domains] == [1500, 1500]


def profile_cmd(model, corpus, tmp_path, tokens: int = 100) -> list[str]:
    out = str(tmp_path / "p.json")
    return ["profile", "--model", str(model), "--corpus", str(corpus), "--tokens", str(tokens), "--output", out]


def expect_error(capsys, match: str, *args: str) -> str:
    code, _, err = run(capsys, *args)
    assert code == 2
    assert match in err, err
    assert "Traceback" not in err
    return err


def test_nonexistent_model_path(tmp_path, capsys):
    expect_error(capsys, "does not exist", *profile_cmd(str(tmp_path / "no-model"), CORPUS, tmp_path))
    assert not (tmp_path / "p.json").exists()


def test_folder_without_config(tmp_path, capsys):
    expect_error(capsys, "has no config.json", *profile_cmd(str(tmp_path), CORPUS, tmp_path))


def test_dense_model(tmp_path, capsys):
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "llama")
    err = expect_error(capsys, "dense model", *profile_cmd(str(tmp_path / "llama"), CORPUS, tmp_path))
    assert "Qwen3-MoE" in err


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "is empty"),
        (gzip.compress(b""), "is empty"),
        (b"\x1f\x8b\x08\x00garbage-not-gzip", "cannot read corpus file"),
        (b"\xff\xfe\xfa not utf-8 \xc3\x28", "not UTF-8"),
    ],
    ids=["empty", "empty-gz", "corrupt-gz", "not-utf8"],
)
def test_bad_corpus_files(tmp_path, capsys, content, match):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    expect_error(capsys, match, *profile_cmd(str(DEMO_MODEL), str(f), tmp_path))
    assert not (tmp_path / "p.json").exists()


def test_corpus_directory_and_missing_file(tmp_path, capsys):
    expect_error(capsys, "is a directory", *profile_cmd(str(DEMO_MODEL), str(tmp_path), tmp_path))
    expect_error(capsys, "does not exist", *profile_cmd(str(DEMO_MODEL), str(tmp_path / "none.txt"), tmp_path))


def test_corpus_too_short(tmp_path, capsys):
    f = tmp_path / "short.txt"
    f.write_text("only a few words here\n")
    expect_error(capsys, "lower --tokens", *profile_cmd(str(DEMO_MODEL), str(f), tmp_path, tokens=5000))


@pytest.mark.parametrize("tokens", ["0", "-5", "many"])
def test_bad_token_count(tmp_path, capsys, tokens):
    with pytest.raises(SystemExit) as info:
        main(
            [
                "profile",
                "--model",
                str(DEMO_MODEL),
                "--corpus",
                CORPUS,
                "--tokens",
                tokens,
                "--output",
                str(tmp_path / "p.json"),
            ]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--tokens" in err and "positive integer" in err


def test_verbose_shows_traceback_for_debugging(tmp_path, capsys):
    code, _, err = run(
        capsys,
        "-v",
        "profile",
        "--model",
        str(tmp_path / "x"),
        "--corpus",
        CORPUS,
        "--tokens",
        "10",
        "--output",
        str(tmp_path / "p.json"),
    )
    assert code == 2 and "Traceback" in err and "does not exist" in err


@pytest.fixture
def profile_file(tmp_path, demo_profile):
    return demo_profile.save(tmp_path / "prof.json")


def test_compile_and_diagnose_commands(tmp_path, capsys, profile_file):
    plan = tmp_path / "plan.json"
    code, out, err = run(capsys, "compile", "--profile", str(profile_file), "--budget", "3.5bpw", "--output", str(plan))
    assert code == 0, err
    assert "bits per weight" in out and "milp" in out
    code, out, err = run(
        capsys, "diagnose", "--profile", str(profile_file), "--artifact", str(plan), "--output", str(tmp_path / "diag")
    )
    assert code == 0, err
    assert "allocation hope" in out and (tmp_path / "diag" / "diagnose.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "diag" / "diagnose.json").read_text())["plan"]["bits_per_weight"] <= 3.5


def test_compile_errors(tmp_path, capsys, profile_file):
    out = str(tmp_path / "plan.json")
    expect_error(capsys, "infeasible", "compile", "--profile", str(profile_file), "--budget", "1bpw", "--output", out)
    expect_error(
        capsys, "cannot read budget", "compile", "--profile", str(profile_file), "--budget", "lots", "--output", out
    )
    expect_error(
        capsys,
        "unknown format",
        "compile",
        "--profile",
        str(profile_file),
        "--budget",
        "int4",
        "--formats",
        "int4,nf4",
        "--output",
        out,
    )
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "exq.routing-profile"')
    expect_error(capsys, "not valid JSON", "compile", "--profile", str(bad), "--budget", "int4", "--output", out)
    expect_error(
        capsys,
        "does not exist",
        "compile",
        "--profile",
        str(tmp_path / "nope.json"),
        "--budget",
        "int4",
        "--output",
        out,
    )
    assert not (tmp_path / "plan.json").exists()
