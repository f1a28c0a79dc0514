"""Corpus reading and batching."""

from __future__ import annotations

import gzip

import pytest
import torch
from conftest import DEMO_CORPUS, DEMO_MODEL

import exq.data.corpus as corpus
from exq.data.corpus import domain_name, load_domains, split_evenly, split_tokens, tokenize_file
from exq.errors import ExqError
from exq.models import load_tokenizer


@pytest.mark.parametrize(("n", "seq", "batch"), [(100, 10, 3), (101, 10, 3), (7, 10, 2), (64, 8, 8), (65, 8, 100)])
def test_split_tokens_covers_every_token_once_without_padding(n, seq, batch):
    t = torch.arange(n)
    batches = list(split_tokens(t, seq, batch))
    assert torch.equal(torch.cat([b.reshape(-1) for b in batches]), t)
    assert all(b.shape[0] <= batch and b.shape[1] <= seq for b in batches)
    assert sum(b.shape[1] < seq for b in batches) == (1 if n % seq else 0)


def test_split_evenly():
    assert split_evenly(10, 3) == [4, 3, 3] and sum(split_evenly(20_000, 4)) == 20_000


def test_domain_names():
    assert domain_name("a/b/austen.valid.txt.gz") == "austen.valid"
    assert domain_name("notes.txt") == "notes"


def test_chunked_tokenization_equals_whole_text(monkeypatch, tmp_path):
    """Reading in line-aligned pieces must not change the tokens."""
    tok = load_tokenizer(DEMO_MODEL)
    text = gzip.decompress((DEMO_CORPUS / "kjv.valid.txt.gz").read_bytes()).decode()[:40_000]
    f = tmp_path / "t.txt.gz"
    f.write_bytes(gzip.compress(text.encode()))
    monkeypatch.setattr(corpus, "_CHUNK_CHARS", 997)
    whole = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert tokenize_file(f, tok, None).tolist() == whole
    assert tokenize_file(f, tok, 1234).tolist() == whole[:1234]


def test_duplicate_domain_names_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "x.txt").write_text("hello world\n" * 50)
    with pytest.raises(ExqError, match="share a domain name"):
        load_domains([tmp_path / "a" / "x.txt", tmp_path / "b" / "x.txt"], load_tokenizer(DEMO_MODEL), 20)
