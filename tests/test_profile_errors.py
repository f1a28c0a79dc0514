"""Bad profile files and bad inputs give clear errors (FormatError / ExqError), never a deep traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from exq.data.corpus import Domain
from exq.errors import ExqError, FormatError
from exq.fileio import dumps_json, sha256_bytes
from exq.models import fingerprint, moe_layers
from exq.profiling import RoutingProfile, profile_domains


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model("olmoe", seed=21)
    g = torch.Generator().manual_seed(22)
    prof = profile_domains(
        model, [Domain("d", None, torch.randint(0, 96, (130,), generator=g))], seq_len=32, batch_size=2, progress=False
    )
    path = prof.save(tmp_path_factory.mktemp("prof") / "p.json")
    return path, prof


def _copy(saved, tmp_path):
    path, _ = saved
    (tmp_path / "p.json").write_bytes(path.read_bytes())
    (tmp_path / "p.npz").write_bytes(path.with_suffix(".npz").read_bytes())
    return tmp_path / "p.json"


def _rewrite(path, edit):
    """Apply `edit` to the header and re-seal the content hash, as a careful hand-edit would."""
    h = json.loads(path.read_text())
    edit(h)
    h.pop("content_sha256", None)
    h["content_sha256"] = sha256_bytes(dumps_json(h))
    path.write_bytes(dumps_json(h))


def test_valid_profile_loads(saved, tmp_path):
    assert RoutingProfile.load(_copy(saved, tmp_path)).tokens == 130


def test_truncated_json(saved, tmp_path):
    p = _copy(saved, tmp_path)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(FormatError, match=r"not valid JSON.*truncated"):
        RoutingProfile.load(p)


def test_empty_and_missing_file(saved, tmp_path):
    p = _copy(saved, tmp_path)
    p.write_text("")
    with pytest.raises(FormatError, match="is empty"):
        RoutingProfile.load(p)
    with pytest.raises(FormatError, match="does not exist"):
        RoutingProfile.load(tmp_path / "nope.json")


def test_hand_edited_json(saved, tmp_path):
    p = _copy(saved, tmp_path)
    p.write_text(p.read_text().replace('"tokens": 130', '"tokens": 131'))
    with pytest.raises(FormatError, match="modified after it was written"):
        RoutingProfile.load(p)


def test_newer_and_older_schema(saved, tmp_path):
    p = _copy(saved, tmp_path)
    _rewrite(p, lambda h: h.update(schema_version=99))
    with pytest.raises(FormatError, match="schema version 99") as info:
        RoutingProfile.load(p)
    assert "upgrade exq" in str(info.value)
    _rewrite(p, lambda h: h.update(schema_version=0))
    with pytest.raises(FormatError, match="schema version 0") as info:
        RoutingProfile.load(p)
    assert "re-create" in str(info.value)


def test_not_a_profile(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"format": "something-else"}')
    with pytest.raises(FormatError, match="not an exq routing profile"):
        RoutingProfile.load(p)


def test_arrays_missing_corrupt_or_swapped(saved, tmp_path):
    p = _copy(saved, tmp_path)
    npz = p.with_suffix(".npz")
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="do not belong"):
        RoutingProfile.load(p)
    npz.unlink()
    with pytest.raises(FormatError, match="missing"):
        RoutingProfile.load(p)


def test_counts_inconsistent_with_tokens(saved, tmp_path):
    """A resealed file whose arrays break the counting invariant is still refused."""
    p = _copy(saved, tmp_path)
    npz = p.with_suffix(".npz")
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["layer0.counts"] = arrays["layer0.counts"].copy()
    arrays["layer0.counts"][0, 0] += 1
    np.savez_compressed(npz, **arrays)
    _rewrite(p, lambda h: h["arrays"].update(sha256=sha256_bytes(npz.read_bytes())))
    with pytest.raises(FormatError, match="do not sum to tokens x top_k"):
        RoutingProfile.load(p)


def test_profile_of_another_model(saved, tmp_path):
    p = _copy(saved, tmp_path)
    same_arch = tiny_model("olmoe", seed=99)  # same config, other router weights
    with pytest.raises(FormatError, match="other router weights"):
        RoutingProfile.load(p, model=fingerprint(same_arch, moe_layers(same_arch)))
    other = tiny_model("mixtral")
    with pytest.raises(FormatError, match="another model"):
        RoutingProfile.load(p, model=fingerprint(other, moe_layers(other)))


def test_profile_domains_rejects_bad_arguments():
    model = tiny_model("olmoe")
    dom = [Domain("d", None, torch.randint(0, 96, (10,)))]
    with pytest.raises(ExqError, match="seq_len"):
        profile_domains(model, dom, seq_len=0, progress=False)
    with pytest.raises(ExqError, match="max_position_embeddings"):
        profile_domains(model, dom, seq_len=10_000, progress=False)
    with pytest.raises(ExqError, match="outside the model's vocabulary"):
        profile_domains(model, [Domain("d", None, torch.tensor([1, 2, 500]))], seq_len=16, progress=False)


def test_save_refuses_directory_and_npz_name(saved, tmp_path):
    _, prof = saved
    with pytest.raises(ExqError, match="is a directory"):
        prof.save(tmp_path)
    with pytest.raises(ExqError, match=r"should end in \.json"):
        prof.save(tmp_path / "p.npz")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.parametrize(
    ("edit", "match"),
    [(lambda h: h["layers"][0].pop("top_k"), "missing a field"), (lambda h: h.pop("arrays"), "no arrays file")],
    ids=["top_k", "arrays"],
)
def test_resealed_header_missing_fields(saved, tmp_path, edit, match):
    p = _copy(saved, tmp_path)
    _rewrite(p, edit)
    with pytest.raises(FormatError, match=match):
        RoutingProfile.load(p)
