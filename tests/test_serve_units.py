"""The serving pieces with hand-checkable answers: sampling filters against brute force, the text stream's stop
strings and held-back text, the slot cache's row bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from exq.errors import ExqError
from exq.serve.detok import TextStream
from exq.serve.kv_cache import SlotCache
from exq.serve.sampling import SamplingParams, filter_logits, sample


def _brute_force(logits: list[float], t: float, k: int, p: float) -> set[int]:
    """Tokens left after top-k then top-p, by sorting by hand."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    if k:
        order = order[:k]
    z = [math.exp(logits[i] / t) for i in order]
    total, kept, mass = sum(z), [], 0.0
    for i, w in zip(order, z, strict=True):
        kept.append(i)
        mass += w / total
        if mass >= p:
            break
    return set(kept)


@pytest.mark.parametrize("t,k,p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.0, 0, 0.5), (1.3, 5, 0.8), (0.5, 2, 0.99)])
def test_filters_keep_exactly_the_brute_force_set(t, k, p):
    g = torch.Generator().manual_seed(int(t * 10 + k + p * 100))
    logits = torch.randn(12, generator=g) * 2
    out = filter_logits(logits, t, k, p)
    kept = set(torch.nonzero(out > float("-inf")).flatten().tolist())
    renormed = (logits / t).softmax(-1)  # the kept tokens keep their relative probabilities
    assert kept == _brute_force(logits.tolist(), t, k, p)
    got = out.softmax(-1)
    idx = sorted(kept)
    assert torch.allclose(got[idx], renormed[idx] / renormed[idx].sum(), atol=1e-6)


def test_sample_greedy_rows_take_the_argmax_and_seeds_repeat():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=0)]
    gens = [None, torch.Generator().manual_seed(5), None]
    a = sample(logits, params, gens)
    assert a[0] == int(logits[0].argmax()) and a[2] == int(logits[2].argmax())
    assert sample(logits, params, [None, torch.Generator().manual_seed(5), None])[1] == a[1]


class CharTokenizer:
    """One token per character; id 0 is a special token, ids 1000+ are the bytes of 'é' (2 tokens)."""

    def decode(self, ids, skip_special_tokens=True):
        out, i = [], 0
        while i < len(ids):
            t = ids[i]
            if t == 0:
                i += 1
                continue
            if t == 1000:  # first half of a two-token character
                out.append("é" if i + 1 < len(ids) and ids[i + 1] == 1001 else "\ufffd")
                i += 2 if i + 1 < len(ids) and ids[i + 1] == 1001 else 1
                continue
            out.append(chr(t))
            i += 1
        return "".join(out)


def _feed(stream: TextStream, text: str) -> list[str]:
    return [stream.add(ord(c)) for c in text]


def test_text_stream_holds_back_a_possible_stop_then_releases_it():
    s = TextStream(CharTokenizer(), ["END"])
    deltas = _feed(s, "abEN")
    assert "".join(deltas) == "ab" and not s.stopped  # "EN" could start "END"
    deltas = _feed(s, "x")
    assert "".join(deltas) == "ENx"  # it did not
    rest = _feed(s, "yEND")
    assert s.stopped and s.text == "abENxy"
    assert "".join(deltas) + "".join(rest) + s.flush() == "ENxy"  # everything before the stop, exactly once


def test_text_stream_stop_across_tokens_and_multibyte_characters():
    s = TextStream(CharTokenizer(), ["\n\n", "zz"])
    assert s.add(1000) == ""  # half a character: nothing final yet
    assert s.add(1001) == "é"
    assert "".join(_feed(s, "a\n")) == "a"
    assert s.add(ord("\n")) == "" and s.stopped and s.text == "éa"
    t = TextStream(CharTokenizer(), [])
    assert "".join(_feed(t, "hello")) + t.flush() == "hello"


def test_slot_cache_rows_and_limits():
    cache = SlotCache(num_layers=1, slots=3, max_len=8)
    layer = cache.layers[0]
    k = torch.randn(2, 2, 5, 4)  # prefill 2 rows of 5 positions into rows 1, 2
    cache.prepare(1, 5, None)
    keys, values = layer.update(k, k + 1)
    assert keys.shape == (2, 2, 5, 4) and torch.equal(layer.keys[1:3, :, :5], k)
    assert torch.equal(values, k + 1)
    new = torch.randn(3, 2, 1, 4)  # decode: rows 0..2 write at their own positions 7, 5, 2
    cache.prepare(0, 8, torch.tensor([7, 5, 2]))
    layer.update(new, new)
    assert torch.equal(layer.keys[0, :, 7], new[0, :, 0]) and torch.equal(layer.keys[2, :, 2], new[2, :, 0])
    cache.move_row(2, 0, 5)
    assert torch.equal(layer.keys[0, :, :5], layer.keys[2, :, :5])
    with pytest.raises(ExqError):
        cache.prepare(0, 9, None)
    with pytest.raises(ExqError):
        SlotCache(num_layers=1, slots=0, max_len=8)


def test_engine_versions_parse_and_gate():
    from exq.errors import ExqError
    from exq.integrations.versions import parse_version, require_version

    assert parse_version("0.5.23rc1") == (0, 5, 23)
    assert parse_version("0.33.0+cu130") == (0, 33, 0)
    assert parse_version("1.2.dev3") == (1, 2)
    require_version("X", "0.5.23rc1", ((0, 5, 20), (0, 6, 0)))
    with pytest.raises(ExqError, match=r"(?s)X 0\.6\.1 is not supported.*< 0\.6\.0"):
        require_version("X", "0.6.1", ((0, 5, 20), (0, 6, 0)))
