"""Profiler numbers against an independent reference: the model's own `output_router_logits` run through exq's
statement of each router's rule, counted with numpy's unbuffered scatter (np.add.at)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DEVICE, DOMAINS, corpus_file
from tiny_models import tiny_configs, tiny_model

from exq.data.corpus import Domain, load_domains, split_tokens
from exq.models import load_model, load_tokenizer, moe_layers
from exq.profiling import RoutingProfile, profile, profile_domains


def router_logits(model, layers, batch):
    """The model's own router logits: `output_router_logits`, or (transformers versions whose DeepSeek outputs lack
    that field) the first output of each router, captured by a hook. Only logits are taken; selection is exq's rule."""
    captured = []
    hooks = [m.router.register_forward_hook(lambda mod, a, out: captured.append(out[0])) for m in layers]
    try:
        res = model(input_ids=batch.to(DEVICE), output_router_logits=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    logits = getattr(res, "router_logits", None) or captured
    assert len(logits) == len(layers)
    return logits


def reference_stats(model, domains, seq_len, batch_size):
    """Per domain and layer: expert ids, routing weights and router probabilities from the router logits."""
    layers = moe_layers(model)
    out = []
    with torch.inference_mode():
        for dom in domains:
            ids = [[] for _ in layers]
            wts = [[] for _ in layers]
            ent = [[] for _ in layers]
            for batch in split_tokens(dom.tokens, seq_len, batch_size):
                # on the model's device, so top-k ties break as they do in the router
                for i, (m, lg) in enumerate(zip(layers, router_logits(model, layers, batch), strict=True)):
                    w, idx = m.rule.select(lg, m.correction_bias)
                    ids[i].append(idx.cpu().numpy())
                    wts[i].append(w.double().cpu().numpy())
                    p = m.rule.probabilities(lg).double().cpu().numpy()
                    ent[i].append(-(p * np.log(np.where(p > 0, p, 1))).sum(axis=1))
            out.append(
                (
                    [np.concatenate(x) for x in ids],
                    [np.concatenate(x) for x in wts],
                    [np.concatenate(x) for x in ent],
                )
            )
    return layers, out


def check_against_reference(prof: RoutingProfile, model, domains, seq_len, batch_size):
    layers, ref = reference_stats(model, domains, seq_len, batch_size)
    assert len(prof.layers) == len(layers)
    for d, dom in enumerate(domains):
        ids, wts, ent = ref[d]
        n = dom.tokens.numel()
        assert prof.domains[d].tokens == n
        for i, m in enumerate(layers):
            e = m.num_experts
            counts = np.zeros(e, dtype=np.int64)
            mass = np.zeros(e)
            np.add.at(counts, ids[i].ravel(), 1)  # unbuffered scatter: every (token, slot) counted once
            np.add.at(mass, ids[i].ravel(), wts[i].ravel())
            assert np.array_equal(prof.counts(i, dom.name), counts), f"layer {i} domain {dom.name}"
            assert prof.counts(i, dom.name).sum() == n * m.top_k
            np.testing.assert_allclose(prof.gate_mass(i, dom.name), mass, rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(prof.mean_token_entropy(i, dom.name), ent[i].mean(), rtol=1e-4)
            same = np.zeros((e, e), dtype=np.int64)
            np.add.at(same, (ids[i][:, :, None], ids[i][:, None, :]), 1)
            assert np.array_equal(prof.coselection(i, dom.name), same)
            if i + 1 < len(layers):
                c = np.zeros((e, layers[i + 1].num_experts), dtype=np.int64)
                np.add.at(c, (ids[i][:, :, None], ids[i + 1][:, None, :]), 1)
                got = prof.coactivation(i, dom.name)
                assert np.array_equal(got, c)
                assert np.array_equal(got.sum(axis=1), counts * layers[i + 1].top_k)


@pytest.mark.parametrize("family", sorted(tiny_configs()))
def test_tiny_models_match_reference(family):
    model = tiny_model(family, seed=7).to(DEVICE)
    g = torch.Generator().manual_seed(8)
    domains = [
        Domain("a", None, torch.randint(0, 96, (300,), generator=g)),
        Domain("b", None, torch.randint(0, 96, (173,), generator=g)),
    ]
    prof = profile_domains(model, domains, seq_len=64, batch_size=3, progress=False)
    check_against_reference(prof, model, domains, 64, 3)


def test_fixture_models_match_reference_on_20k_tokens(real_model_path):
    """Acceptance: 20 000 tokens; counts exactly equal the reference; co-activation rows sum to count_i x k."""
    model = load_model(real_model_path, device=DEVICE)
    tok = load_tokenizer(real_model_path)
    files = [corpus_file(d, "valid") for d in DOMAINS]
    domains = load_domains(files, tok, 20_000)
    prof = profile(model, files, 20_000, tokenizer=tok, seq_len=512, batch_size=8, progress=False)
    assert prof.tokens == 20_000
    for i, lp in enumerate(prof.layers):
        assert prof.counts(i).sum() == 20_000 * lp.top_k
    check_against_reference(prof, model, domains, 512, 8)


def test_domains_add_up_and_views_are_consistent(tmp_path):
    model = tiny_model("qwen3_moe", seed=9)
    g = torch.Generator().manual_seed(10)
    domains = [Domain(n, None, torch.randint(0, 96, (k,), generator=g)) for n, k in (("x", 200), ("y", 120))]
    prof = profile_domains(model, domains, seq_len=50, batch_size=2, progress=False)
    for i in range(len(prof.layers)):
        assert np.array_equal(prof.counts(i), prof.counts(i, "x") + prof.counts(i, "y"))
        np.testing.assert_allclose(prof.frequency(i).sum(), prof.layers[i].top_k)
        np.testing.assert_allclose(prof.share(i).sum(), 1.0)
        assert 0.0 <= prof.marginal_entropy(i) <= np.log(prof.layers[i].num_experts) + 1e-9
        if i + 1 < len(prof.layers):
            p = prof.next_layer_probability(i)
            used = prof.counts(i) > 0
            np.testing.assert_allclose(p[used].sum(axis=1), prof.layers[i + 1].top_k)
            assert (p >= 0).all() and (p <= 1 + 1e-12).all()


def hand_layer():
    """2 tokens, top-2 of 4 experts: token 1 chose {0, 1}, token 2 chose {0, 2}; per-token entropies sum to 1.0."""
    from exq.profiling import LayerProfile

    cosel = np.array([[[2, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]])
    return LayerProfile(0, 0, 4, 2, np.array([[2, 1, 1, 0]]), np.zeros((1, 4)), np.array([1.0]), cosel, None)


def test_marginal_entropy_hand_computed():
    """Shares 1/2, 1/4, 1/4, 0 -> H = -(.5 ln .5 + 2 x .25 ln .25)."""
    from exq.profiling import DomainInfo

    lp = hand_layer()
    prof = RoutingProfile({}, [DomainInfo("d", "", "", 2)], [lp], 2, 1, "float32")
    assert prof.marginal_entropy(0) == pytest.approx(-(0.5 * np.log(0.5) + 0.5 * np.log(0.25)))
    assert prof.mean_token_entropy(0) == pytest.approx(0.5)


def test_save_load_roundtrip_is_exact(tmp_path):
    model = tiny_model("deepseek_v3", seed=11)
    g = torch.Generator().manual_seed(12)
    prof = profile_domains(
        model, [Domain("d", None, torch.randint(0, 96, (150,), generator=g))], seq_len=40, batch_size=2, progress=False
    )
    path = prof.save(tmp_path / "p.json")
    back = RoutingProfile.load(path, model=prof.model)
    assert back.model == prof.model and back.domains == prof.domains and back.seq_len == 40
    for a, b in zip(prof.layers, back.layers, strict=True):
        assert np.array_equal(a.counts, b.counts) and np.array_equal(a.gate_mass, b.gate_mass)
        assert np.array_equal(a.token_entropy_sum, b.token_entropy_sum) and np.array_equal(a.cosel, b.cosel)
        assert (a.coact is None and b.coact is None) or np.array_equal(a.coact, b.coact)
    # saving twice gives identical bytes (deterministic format)
    back.save(tmp_path / "q.json")
    assert (tmp_path / "p.npz").read_bytes() == (tmp_path / "q.npz").read_bytes()

    def header(p):
        return {k: v for k, v in json.loads(p.read_text()).items() if k not in ("arrays", "content_sha256")}

    assert header(tmp_path / "p.json") == header(tmp_path / "q.json")


def test_plot_single_and_multi_layer(tmp_path):
    from exq.profiling import DomainInfo
    from exq.profiling.plot import plot_profile

    lp = hand_layer()
    one = RoutingProfile({}, [DomainInfo("d", "", "", 2)], [lp], 2, 1, "float32")
    model = tiny_model("mixtral", seed=13)
    many = profile_domains(model, [Domain("d", None, torch.randint(0, 96, (90,)))], seq_len=30, progress=False)
    for name, prof in (("one", one), ("many", many)):
        path = plot_profile(prof, tmp_path / f"{name}.png")
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 5_000
